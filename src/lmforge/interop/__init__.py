"""Other tools' formats: HuggingFace ``transformers`` directories and GGUF files (llama.cpp), both ways.

- ``hf_config``: which HF family (GPT-2 or Llama) a model is, and its ``config.json``;
- ``hf``: export to and import from a ``transformers`` directory;
- ``gguf_tensors`` and ``gguf``: GGUF tensor names and layout, then the file's metadata and tokenizer.
"""
