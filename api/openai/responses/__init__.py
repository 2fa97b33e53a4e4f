"""OpenAI's Responses API, served by jobs."""
