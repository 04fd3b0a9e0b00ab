"""Text in and out: tokenizers (sentencepiece and byte-level BPE styles) and chat templates."""
