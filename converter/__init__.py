"""Converters from Hugging Face folders to distributed-llama files (installed as dllama_py.converter)."""
