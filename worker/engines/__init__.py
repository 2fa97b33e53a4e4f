"""The engines a worker runs its jobs on, behind one contract (`base`): the built-in transformers engine
(`transformers`, on worker/engine.py's continuous batching), and the HTTP engines (`http`): an
OpenAI-compatible server (`openai_http`) or vLLM's (`vllm`, optionally run beside the worker by
`vllm_server`). One engine-agnostic runner (worker/jobs.py) drives each of them: claim, events,
deadlines, webhooks, resume and the final write do not depend on the engine.
"""
