"""Where the data stages run: in this process, in a local process pool, or on a Ray cluster.

An engine runs a function it is handed over a stream of items and gives the results back in input
order, with bounded look-ahead; it knows nothing of what the function does (reading a corpus,
encoding text). The stages choose the function, the engine where it runs:

- ``choice``: ``open_engine(data_cfg, function, name)``, the engine ``data.engine`` and ``data.workers`` ask for;
- ``local``: in this process, or a pool of spawned worker processes;
- ``ray``: Ray tasks on a local Ray or a cluster (``data.ray_address``); Ray is imported only there;
- ``workers``: what they share (worker count, in-order look-ahead, the worker side of a task).
"""
