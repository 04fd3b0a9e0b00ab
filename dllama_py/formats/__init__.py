"""Files on disk: distributed-llama's model (.m) and tokenizer (.t) formats."""
