"""HTTP side of inferq: FastAPI app, routes, error envelope, SSE relay."""
