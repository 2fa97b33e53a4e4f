"""One pydantic-settings class for every part of inferq, read from `INFERQ_*` variables."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared import capabilities, keys

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
MIN_ADMIN_KEY_CHARS = 32


def default_data_dir() -> Path:
    return Path.home() / ".inferq"


class ModelSettings(BaseModel):
    name: str = Field(
        default="",
        description="Hugging Face id or local directory; empty means the demo model under the data dir.",
    )
    gguf_file: str | None = Field(default=None, description="GGUF file inside `name` to load and dequantize.")
    served_name: str = Field(default="", description="Name jobs and /v1/models use; defaults to the model's.")
    device: str = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto, float32, bfloat16 or float16 (docs/engine.md)."
    )
    max_batch: int = Field(default=32, ge=1, description="Requests per engine step; also arq's max_jobs.")
    max_batch_tokens: int = Field(default=512, ge=16, description="Tokens per engine step (prefill chunk).")
    num_blocks: int | None = Field(default=None, description="KV-cache pages; None sizes them from memory.")
    page_size: int = Field(
        default=16,
        ge=16,
        description="KV-cache page in tokens: prompts share a common prefix in whole pages (docs/engine.md).",
    )
    pack_weights: bool = Field(
        default=True,
        description="A CPU chat model's linear layers multiply on weights laid out once for oneDNN "
        "(worker/packed_linear.py); false: plain weights.",
    )
    trace_embedder: bool = Field(
        default=True,
        description="An embedding model on a CPU runs as a TorchScript graph traced at load, which holds "
        "Python's GIL only to start and end a forward pass (worker/embedder.py); false: eager PyTorch.",
    )
    embed_batch_tokens: int = Field(
        default=8192,
        ge=16,
        description="An embedding model's forward pass: at most this many tokens, padding included.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="Most CPU threads torch runs (None: one per core); a CPU worker runs one per core that "
        "other processes leave free (worker/cpu_threads.py).",
    )


class LimitSettings(BaseModel):
    max_prompt_tokens: int = Field(default=4096, ge=1)
    max_tokens: int = Field(default=2048, ge=1, description="Upper bound for a job's max_tokens.")
    default_max_tokens: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_metadata_bytes: int = Field(default=4096, ge=2)
    max_stop: int = Field(default=4, ge=0)
    max_n: int = Field(default=8, ge=1, description="Most outputs (n) one request may ask for.")
    max_stop_chars: int = Field(default=64, ge=1)
    max_schema_bytes: int = Field(
        default=32_768, ge=16, description="Largest response_format JSON schema (canonical JSON bytes)."
    )
    # Deadlines: a job's running time (timeout_seconds) and its whole life from submission (Cancel-After).
    default_timeout_seconds: float | None = Field(
        default=600.0, gt=0, description="Running time a job gets when it asks for none; null: unbounded."
    )
    max_timeout_seconds: float = Field(default=3600.0, gt=0)
    max_cancel_after_seconds: float = Field(default=7 * 86_400.0, gt=0)


class QueueSettings(BaseModel):
    """Base names; every model has its own pair of queues, so a worker only ever sees its model's jobs."""

    interactive: str = "{inferq}:queue:interactive"
    batch: str = "{inferq}:queue:batch"

    @field_validator("interactive", "batch")
    @classmethod
    def _tagged(cls, name: str) -> str:
        # arq moves jobs between a queue and its own keys in transactions: one hash slot for all.
        if not name.startswith(keys.QUEUE_TAG + ":"):
            raise ValueError(f"queue names must start with '{keys.QUEUE_TAG}:' (Redis Cluster hash tag)")
        return name

    def for_model(self, model: str, *, batch: bool = False) -> str:
        return f"{self.batch if batch else self.interactive}:{model}"


class WorkerSettings(BaseModel):
    poll_delay: float = Field(default=0.005, gt=0, description="Shortest time between queue polls when idle.")
    busy_poll_delay: float | None = Field(
        default=None,
        ge=0,
        description="Extra wait between polls while jobs run; unset: 0.05 s, or 0.005 s for an embedding "
        "model, whose jobs take a few milliseconds of model time (bench/RESULTS.md).",
    )
    poll_fallback: float = Field(
        default=1.0, gt=0, description="Longest wait between polls when no enqueue wakes the worker."
    )
    job_timeout: int = Field(default=3600, ge=1)
    max_tries: int = Field(
        default=50, ge=1, description="arq's own cap on starts of one job; max_attempts is the real limit."
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Starts of a job before a lost worker fails it with worker_lost."
    )
    drain_seconds: float = Field(
        default=60.0, ge=0, description="On SIGTERM, how long held jobs may run before they are requeued."
    )
    engine: Literal["transformers", "openai-http", "vllm"] = Field(
        default="transformers",
        description="transformers: the model runs here; openai-http: jobs go to an OpenAI-compatible server; "
        "vllm: jobs go to vLLM's OpenAI server (started beside the worker unless upstream_url is set).",
    )
    upstream_url: str | None = Field(
        default=None,
        description="openai-http, vllm: base URL of the server, e.g. http://vllm:8000/v1 (vllm: a vLLM "
        "someone else runs; unset, the worker runs its own).",
    )
    upstream_model: str | None = Field(
        default=None, description="openai-http, vllm: the model name it expects."
    )
    upstream_api_key: str | None = Field(default=None, description="openai-http, vllm: its API key, if any.")
    upstream_capabilities: str | None = Field(
        default=None,
        description="openai-http: what the upstream honours, comma-separated, e.g. "
        "'n,logprobs,top_logprobs=20,top_k,response_format,seed,stop' (each is then forwarded and mapped "
        "back as on the vllm engine; the API refuses the rest with a 400 naming the field). Unset: "
        "'seed,stop', what every OpenAI-compatible server honours.",
    )
    upstream_sidecar: bool = Field(
        default=False,
        description="openai-http, vllm: the server at upstream_url runs beside this worker and its platform "
        "starts and restarts it (a Kubernetes sidecar container, a Compose service): the worker waits up to "
        "vllm_start_seconds for it at start, with a progress line, and a job whose stream it loses goes "
        "back to the queue instead of failing.",
    )
    vllm_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="vllm: the loopback port of the worker's own vLLM; 0: a free one.",
    )
    vllm_args: list[str] = Field(
        default_factory=list,
        description="vllm: extra arguments for the worker's own vLLM server, e.g. "
        '["--max-model-len", "4096"].',
    )
    vllm_start_seconds: float = Field(
        default=900.0,
        gt=0,
        description="vllm: how long the worker's own vLLM (or a sidecar's, upstream_sidecar) may take to "
        "answer /health.",
    )
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of the worker's /metrics; 0: none."
    )
    metrics_host: str = Field(default="0.0.0.0", description="Interface the worker's /metrics listens on.")
    advertise_host: str | None = Field(
        default=None,
        description="Host name in the worker's registry entry (`metrics_url`); default: the metrics "
        "interface when it is a single address, else this machine's host name.",
    )
    dead_after_missed: int = Field(default=3, ge=1, description="Missed heartbeats that make a worker dead.")
    interactive_reserve: int | None = Field(
        default=None,
        ge=0,
        description="Engine slots batch jobs leave free for interactive ones; None means a quarter.",
    )

    @field_validator("upstream_capabilities")
    @classmethod
    def _known_capabilities(cls, value: str | None) -> str | None:
        if value is not None:
            capabilities.parse_upstream(value)  # its ValueError says what is wrong and what is known
        return value


class FleetSettings(BaseModel):
    """What the API processes do for the worker fleet (one process at a time, under a Redis lease)."""

    reaper_seconds: float = Field(default=1.0, gt=0, description="How often dead workers' jobs are sought.")
    reconcile_seconds: float = Field(
        default=60.0, gt=0, description="How often queued jobs missing from Redis are re-enqueued."
    )
    reconcile_grace_seconds: float = Field(
        default=10.0, ge=0, description="Younger queued jobs may still be on their way to Redis."
    )


class BatchSettings(BaseModel):
    max_file_bytes: int = Field(default=100_000_000, ge=1024, description="Largest upload to /v1/files.")
    max_lines: int = Field(default=50_000, ge=1, description="Most requests in one batch input file.")
    max_line_bytes: int = Field(
        default=2_000_000,
        ge=1024,
        description="Longest line of a batch input file; a longer one (a file with no line break) is "
        "refused unparsed.",
    )
    queue_target: int = Field(
        default=256, ge=1, description="Batch jobs kept waiting in Redis; the feeder tops the queue up to it."
    )
    tick_seconds: float = Field(default=0.25, gt=0, description="How often the batch manager looks.")
    max_errors_listed: int = Field(default=100, ge=1, description="Bad lines named when a file is refused.")


class WebhookSettings(BaseModel):
    allow_private: bool = Field(
        default=False,
        description="Allow receivers on loopback and private addresses (local use and tests); link-local, "
        "unspecified, reserved and cloud metadata addresses stay refused.",
    )
    allow_only: list[str] = Field(
        default_factory=list,
        description='If set, the only networks (CIDRs) receivers may be on, e.g. ["10.1.0.0/16"]; '
        "checked after the rules above.",
    )
    retry_schedule: list[float] = Field(
        default=[0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400],
        min_length=1,
        description="Seconds after the event of each try (Standard Webhooks' example schedule); a JSON "
        "list in the environment, e.g. INFERQ_WEBHOOKS__RETRY_SCHEDULE='[0, 5, 300]'.",
    )
    dispatch: bool = Field(
        default=True, description="Whether this API process takes its turn at sending deliveries."
    )
    timeout_seconds: float = Field(default=10.0, gt=0, description="Each delivery's whole-request timeout.")
    per_endpoint: int = Field(default=4, ge=1, description="Deliveries in flight at once to one URL.")
    batch: int = Field(default=200, ge=1, description="Deliveries taken per dispatcher tick.")
    tick_seconds: float = Field(default=0.25, gt=0, description="How often the dispatcher looks.")
    output_seconds: float = Field(
        default=0.5, gt=0, description="Least time between two `output` webhooks of one job."
    )
    rotation_overlap_seconds: int = Field(
        default=86_400, ge=0, description="How long a rotated-out secret still signs (both are sent)."
    )


class RetentionSettings(BaseModel):
    seconds: int | None = Field(
        default=None,
        ge=60,
        description="Remove the prompt, output and events of jobs finished this long ago (off: unset).",
    )
    batch: int = Field(default=500, ge=1, description="Jobs cleared per statement: short locks.")
    tick_seconds: float = Field(default=30.0, gt=0, description="How often the retention duty looks.")


class EventSettings(BaseModel):
    redis_url: str | None = Field(
        default=None,
        description="Redis for job events (streams, live channels, cancel flags), e.g. a Redis or Valkey "
        "Cluster of many shards; unset: the queue's Redis (INFERQ_REDIS_URL).",
    )
    cluster: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Whether the events Redis is a cluster (sharded pub/sub, a client per shard); auto: "
        "asks the server (INFO cluster).",
    )
    stream_maxlen: int = Field(default=20_000, ge=100, description="Cap of a job's Redis event stream.")
    ttl_seconds: int = Field(default=86_400, ge=60, description="How long a job's events stay in Redis.")
    ping_seconds: float = Field(default=15.0, gt=0)
    coalesce_ms: float = Field(
        default=0.0,
        ge=0,
        le=50,
        description="How long a job's token event may wait for its next tokens and take them in (one "
        "event for several engine steps, fewer Redis calls); 0, the default: one event per step.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQ_", env_nested_delimiter="__", extra="ignore")

    redis_url: str | None = None
    database_url: str | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    environment: str = Field(default="development", description="development or production.")
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per line.")
    auth: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="auto: open until the first API key is created, then keys are required for good "
        "(revoking every key leaves a closed API, not an open one); on: always required; off: open to "
        "anyone who can reach the API, even where keys exist.",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="A bearer key (32+ characters) that acts for the `default` tenant with the admin "
        "view of the fleet (every worker's jobs, hosts, pids); setting it makes keys required in `auto`.",
    )
    auth_cache_seconds: float = Field(
        default=5.0, ge=0, description="How long an API process trusts what it read of a key (revocations)."
    )
    rate_window_seconds: int = Field(
        default=60, ge=1, description="Window of the per-key request limit (`--rate` requests per window)."
    )
    max_queue_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Admission control: interactive jobs get 429 when the queued work would take longer.",
    )
    idempotency_ttl_seconds: int = Field(default=86_400, ge=1, description="How long Idempotency-Keys hold.")
    cancel_on_disconnect: bool = Field(
        default=True, description="Cancel the job when an OpenAI-route client disconnects before the end."
    )
    # Browsers as clients: the web console at /ui, and pages on other origins.
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins whose pages may call the API (CORS), e.g. https://app.example.com; a JSON "
        "list or comma-separated; empty (the default): none.",
    )
    stream_token_secret: SecretStr | None = Field(
        default=None,
        description="Key of the HMAC that signs stream tokens (EventSource URLs); unset: one kept in "
        "Redis, made once and shared by every API process.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        min_length=1,
        description="When set, every /metrics (the API's and each worker's) requires "
        "'Authorization: Bearer <token>'; unset: open, like the probes.",
    )
    stream_token_seconds: int = Field(
        default=300, ge=1, le=86_400, description="How long a stream token lets a client (re)connect."
    )

    @field_validator("admin_key")
    @classmethod
    def _admin_key_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_KEY_CHARS:
            raise ValueError(f"INFERQ_ADMIN_KEY must be at least {MIN_ADMIN_KEY_CHARS} characters")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [o.strip() for o in text.split(",") if o.strip()]
        return value

    model: ModelSettings = Field(default_factory=ModelSettings)
    extra_models: dict[str, str] = Field(
        default_factory=dict,
        description="More models jobs may name (served name -> Hugging Face id or directory of its "
        "tokenizer), for fleets where workers serve several models; the API counts their tokens.",
    )
    limits: LimitSettings = Field(default_factory=LimitSettings)
    queues: QueueSettings = Field(default_factory=QueueSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    batches: BatchSettings = Field(default_factory=BatchSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    @property
    def model_path(self) -> str:
        """Where the model (and its tokenizer) is loaded from."""
        return self.model.name or str(self.data_dir / "models" / DEMO_MODEL_NAME)

    @property
    def embedding_model_path(self) -> str:
        """Where `inferq model fetch --embeddings` puts the demo embedding model."""
        return str(self.data_dir / "models" / DEMO_EMBEDDING_MODEL_NAME)

    @property
    def served_model_name(self) -> str:
        if self.model.served_name:
            return self.model.served_name
        return DEMO_MODEL_NAME if not self.model.name else Path(self.model.name.rstrip("/")).name

    def require_urls(self) -> tuple[str, str]:
        urls = {"INFERQ_REDIS_URL": self.redis_url, "INFERQ_DATABASE_URL": self.database_url}
        missing = [name for name, value in urls.items() if not value]
        if missing:
            raise MissingUrls(missing)
        assert self.redis_url and self.database_url
        return self.redis_url, self.database_url

    def require_model_dir(self) -> str:
        """The model path, once known not to be a local directory that is missing (see require_dir)."""
        hint = MODEL_NAME_HINT if self.model.name else MODEL_FETCH_HINT
        return require_dir(self.model_path, hint)


MODEL_DIR_MISSING = "model directory {path} does not exist: {hint}"
MODEL_FETCH_HINT = "run `inferq model fetch` (or set INFERQ_MODEL__NAME / INFERQ_DATA_DIR)"
MODEL_NAME_HINT = "set INFERQ_MODEL__NAME to a model directory or a Hugging Face id"
EXTRA_MODEL_HINT = "fix its entry in INFERQ_EXTRA_MODELS"


class MissingUrls(RuntimeError):
    """An API, worker or migration started without the servers' URLs."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        verb = "is" if len(names) == 1 else "are"
        super().__init__(
            f"{' and '.join(names)} {verb} not set (or use `inferq up`, which starts embedded servers)"
        )


class ModelDirMissing(RuntimeError):
    pass


def require_dir(path: str, hint: str) -> str:
    """`path`, unless it names a local file or directory (absolute, or starting with ., .. or ~) that does
    not exist. transformers takes any other string for a Hugging Face id and fails with a message about
    repo ids, or, offline, a download error: neither names the path nor how to get the model."""
    local = Path(path).is_absolute() or path.startswith(("./", "../", "~"))
    if local and not Path(path).expanduser().exists():
        raise ModelDirMissing(MODEL_DIR_MISSING.format(path=path, hint=hint))
    return path


@lru_cache
def get_settings() -> Settings:
    return Settings()
