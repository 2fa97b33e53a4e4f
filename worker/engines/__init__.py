"""Engines a worker can forward its jobs to, behind one small interface (`http.HttpEngine`): an
OpenAI-compatible server (`openai_http`) or vLLM's (`vllm`, optionally run beside the worker by
`vllm_server`). The job runner (`http.HttpRunner`, on `worker.jobs.JobRunner`) is the same for all of
them: claim, events, deadlines, webhooks, resume and the final write do not depend on the server.

The built-in transformers engine (worker/engine.py) runs in process and is driven by JobRunner itself.
"""
