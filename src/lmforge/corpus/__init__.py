"""Stage 1, prepare: read the sources, decode, clean, deduplicate and split into train/val text.

The journey of the text, one module each:

- ``sources``: ``data.sources`` (files, directories, globs, ``package:NAME/GLOB``) to files and formats;
- ``reading``: documents out of plain text, JSONL and Parquet files, gzip/bz2/xz/zstd or not;
- ``cleaning``: LF line ends, no control characters, Unicode normal form;
- ``documents``: a file's documents through those rules, short and duplicate ones dropped (both engines);
- ``batches``: the same reading handed to an engine's workers in batches of files (``data.engine=ray``);
- ``stage``: ``prepare_stage(cfg)``, which runs them (in this process or on Ray) and writes the splits.

The split files are read back, in chunks, by ``lmforge.tokenization.chunks``; their names are
``lmforge.config.paths``'.

Output (``paths.prepared``): ``train.txt`` and ``val.txt``; the counts go to
``reports/prepare.json`` (DVC metrics). Split rules (``data.split``):

- ``position``: the kept documents joined by ``data.join`` into one text, the first
  ``1 - val_fraction`` of its characters are train, the rest val. This is nanoGPT's split, so
  figures on the default corpus are comparable with it; each split is then one document.
- ``document``: each document goes wholly to val when a hash of its content falls below
  ``val_fraction``. Adding documents never moves existing ones between splits.
"""
