"""The contract that `api/` and `worker/` both import: settings, schemas, models, keys, events."""

__version__ = "0.1.0"
