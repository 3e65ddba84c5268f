"""Other tools' formats: HuggingFace ``transformers`` directories and GGUF files (llama.cpp), both ways.

- ``hf_config``: which family (GPT-2 or Llama) a model is, and its ``config.json``;
- ``weights``: the one weight-name table per family that every export and import below reads;
- ``hf``: export to and import from a ``transformers`` directory;
- ``base``: a fine-tune's base model as our network (its weights, rows for added tokens);
- ``gguf_vocab`` and ``gguf``: GGUF's tokenizer and llama.cpp's pre-tokenizers, then the file itself.
"""
