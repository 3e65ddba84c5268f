"""Stages 2 and 3, vocab and tokenize: text to token ids, and token ids to shards on disk.

- ``pretokenize``: the splitting rules before a vocabulary applies (word and byte-level BPE);
- ``tokenizer``: the ``tokenizer.json`` file and the fast encoder used by every stage;
- ``vocab``: the vocab stage (char, word or byte-level BPE vocabularies, or a fine-tune's base's);
- ``base``: a fine-tune's base model: where (local or a Hub id), which files, its tokenizer adopted;
- ``encode``: the tokenize stage (both splits to token shards);
- ``shards``: the shard format on disk (``index.json``, ``shard_*.bin``) and its memory-mapped reader.
"""
