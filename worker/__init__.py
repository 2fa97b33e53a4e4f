"""GPU side of inferq: arq worker, model loading, continuous-batching engine, event publishing."""
