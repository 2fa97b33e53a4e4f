"""Offline batches in OpenAI's Batch API shape: validation, feeding the batch queue, results files."""
