"""Wire names for browser clients: the web console's path, the stream token's route piece and query
parameter (a native EventSource can send no header), and the headers CORS is about."""

from __future__ import annotations

UI_PATH = "/ui"
STREAM_TOKEN_PATH = "stream_token"  # POST /v1/jobs/{job_id}/stream_token
STREAM_TOKEN_PARAM = "token"  # GET /v1/jobs/{job_id}/events?token=...
AUTHORIZATION = "Authorization"
LAST_EVENT_ID = "Last-Event-ID"
LOCATION = "Location"
CONTENT_TYPE = "Content-Type"
