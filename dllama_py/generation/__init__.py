"""Generation over an engine: prompts in batches, tokens one by one, stop strings, chat turns."""
