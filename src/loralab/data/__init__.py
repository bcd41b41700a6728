"""Data: reading files, recognising their format, chat templates and batching."""
