"""The OpenAI-compatible surface: chat and text completions, models, files and batches."""
