"""`dllama-api`: an OpenAI-compatible HTTP server and web chat over the engine (see server.py)."""
