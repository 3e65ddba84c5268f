"""Where the data stages run: in this process, in a local process pool, or on a Ray cluster.

``ray``: prepare and tokenize on Ray with the same bytes out as the local engine.
"""
