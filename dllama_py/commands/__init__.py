"""The command-line programs: `dllama` (inference, chat, worker, demo) and its shared options."""
