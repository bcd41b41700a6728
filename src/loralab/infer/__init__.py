"""Using what was trained: loading base + adapters, chat, batch generation, prediction and evaluation, merging."""
