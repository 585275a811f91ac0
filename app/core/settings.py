"""One typed settings object, read once from the environment (prefix ``LAFTER_``).

The defaults are the embedded single-user mode: SQLite, a broker that needs no server (kombu's
filesystem transport), blobs in a local folder, all under ``data_dir``. The production shape sets
``LAFTER_ENV=production`` plus Postgres and Redis URLs, and refuses to start on the embedded
defaults (see ``check_production``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAFTER_", env_file=".env", extra="ignore")

    env: Literal["development", "production", "test"] = "development"
    log_level: str = "INFO"

    # --- storage of rows, messages and blobs -------------------------------------------------
    data_dir: Path = Path("./data")
    database_url: str = ""  # default: sqlite:///{data_dir}/lafter.db
    broker_url: str = ""  # default: filesystem:// under {data_dir}/broker
    db_connect_timeout_s: int = Field(default=5, ge=1)  # a dead database answers 503 this fast
    db_pool_timeout_s: float = Field(default=10.0, gt=0)  # waiting for a pooled connection, then 503
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None  # default: {data_dir}/blobs
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    # --- HTTP ---------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    default_owner_id: str = "default"
    # API keys (``Authorization: Bearer``). ``python -m app`` defaults to "off" (single-user, loudly
    # logged); everything else defaults to "on", and production refuses "off".
    auth: Literal["on", "off"] = "on"
    # /metrics (every owner's job counts): with a token, it needs 'Authorization: Bearer <token>';
    # without one it is open in development and the embedded mode, and off (404) in production.
    metrics_token: SecretStr | None = None
    page_size_default: int = Field(default=20, ge=1)
    page_size_max: int = Field(default=100, ge=1)

    # --- upload limits ------------------------------------------------------------------------
    max_request_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    max_file_bytes: int = Field(default=25 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    min_image_side: int = Field(default=8, ge=1)
    max_files_per_request: int = Field(default=10_000, ge=1)
    max_archive_members: int = Field(default=50_000, ge=1)
    max_archive_bytes: int = Field(default=2 * 1024 * 1024 * 1024, ge=1)
    max_archive_ratio: float = Field(default=100.0, gt=1)  # unpacked / compressed bytes
    max_unpacked_files: int = Field(default=50_000, ge=1)  # files of one request, archives unpacked

    # --- jobs ---------------------------------------------------------------------------------
    min_images_per_job: int = Field(default=16, ge=1)
    max_classes: int = Field(default=1000, ge=2)
    max_class_name_length: int = Field(default=200, ge=1)
    allow_random_weights: bool = False
    # base_model may name a file anywhere on the server, not only in LAFTER_LOCAL_MODEL_DIRS: for an
    # operator's own experiments, never with other users (production refuses it)
    allow_any_model_path: bool = False
    gpu_queue: str = "gpu"
    job_time_limit_s: int = Field(default=6 * 3600, ge=60)
    broker_visibility_timeout_s: int = Field(default=8 * 3600, ge=60)
    cancel_poll_interval_s: float = Field(default=1.0, gt=0)
    progress_write_interval_s: float = Field(default=0.5, ge=0)
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)  # an Idempotency-Key names one job this long
    # GET /v1/jobs/{id}/events as Server-Sent Events: how often the stream reads the database for new
    # events, and how often it sends a comment line so proxies keep an idle stream open
    events_poll_interval_s: float = Field(default=0.5, gt=0, le=60)
    events_heartbeat_s: float = Field(default=15.0, gt=0, le=3600)

    # --- crash-safe jobs, per-owner caps (worker/, app/jobs/reaper.py) --------------------------
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)  # no heartbeat this long: its worker is lost
    max_job_attempts: int = Field(default=3, ge=1)  # runs of a job before a lost worker fails it
    reaper_interval_s: float = Field(default=5.0, ge=0)  # the API's housekeeping loop; 0: not here
    requeue_after_s: float = Field(default=3600.0, gt=0)  # a queued job's message is re-sent this often
    checkpoint_every_s: float = Field(default=60.0, ge=0)  # stage-2 checkpoints; 0: by steps only
    checkpoint_every_steps: int = Field(default=0, ge=0)  # 0: by time only
    max_active_jobs_per_owner: int = Field(default=2, ge=0)  # running + sent to workers; 0: no cap

    # --- webhooks (app/webhooks, delivered by worker/webhooks.py) -------------------------------
    # Let webhook URLs reach loopback, private, link-local and other non-public addresses (an
    # operator's own network, tests); off, such URLs are refused at submit and again at delivery.
    webhook_allow_private: bool = False
    webhook_timeout_s: float = Field(default=10.0, gt=0)  # connect, send and read, per attempt
    # Waits between attempts (seconds, comma-separated): attempts = len + 1. The default grows x3,
    # from 10 s to about 2 h (about 3 h from the first attempt to the last).
    webhook_retry_delays_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [10.0, 30.0, 90.0, 270.0, 810.0, 2430.0, 7290.0]
    )
    webhook_poll_interval_s: float = Field(default=1.0, gt=0)  # the worker's look at the outbox
    webhook_concurrency: int = Field(default=4, ge=1)  # messages sent at once by one worker

    # --- models and compute -------------------------------------------------------------------
    local_model_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    model_cache_dir: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    api_device: str = "cpu"
    torch_threads: int = Field(default=0, ge=0)  # 0: leave torch's default
    adapted_cache_size: int = Field(default=32, ge=1)
    base_model_cache_size: int = Field(default=2, ge=1)
    classify_batch_size: int = Field(default=64, ge=1)  # the most images in one classify forward
    # how long the classify batcher waits for more requests before a forward (0: it never waits;
    # requests that arrive while a forward runs still share the next one)
    classify_batch_window_ms: float = Field(default=0.0, ge=0, le=1000)
    classify_max_images: int = Field(default=256, ge=1)
    # how long a classify may reuse a model's row (owner, checksum, class names) without reading the
    # database: rows never change, but a model deleted through another API process can still answer
    # for this long (this process forgets it at once). 0: read the row on every request.
    classify_model_row_ttl_s: float = Field(default=5.0, ge=0, le=3600)
    # a base model that failed to load in the API is not tried again for this long (s)
    base_model_retry_after_s: float = Field(default=300.0, ge=0)

    # --- language model for descriptions (any OpenAI-compatible endpoint) ---------------------
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: str | None = None
    llm_timeout_s: float = Field(default=60.0, gt=0)

    # --- embedded mode ------------------------------------------------------------------------
    embedded_worker: bool = True
    # ``python -m app`` on SIGTERM/SIGINT: how long its worker may take to stop (its running job
    # stops before the next step and writes a checkpoint) before it is killed
    worker_stop_timeout_s: float = Field(default=60.0, gt=0)

    @field_validator("local_model_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part for part in text.replace(";", ",").split(",") if part.strip()] if text else []
        return value

    @field_validator("webhook_retry_delays_s", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().strip("[]")
            return [float(part) for part in text.split(",") if part.strip()]
        return value

    @field_validator("webhook_retry_delays_s")
    @classmethod
    def _delays_non_negative(cls, value: list[float]) -> list[float]:
        if any(d < 0 for d in value):
            raise ValueError("LAFTER_WEBHOOK_RETRY_DELAYS_S must be non-negative seconds")
        return value

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_switch(cls, value: object) -> object:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            text = value.strip().lower()
            return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(
                text, text
            )
        return value

    @model_validator(mode="after")
    def _defaults_and_consistency(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'lafter.db').resolve()}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "blobs"
        if self.broker_visibility_timeout_s <= self.job_time_limit_s:
            raise ValueError(
                "LAFTER_BROKER_VISIBILITY_TIMEOUT_S must exceed LAFTER_JOB_TIME_LIMIT_S, or a long job "
                "is redelivered to a second worker while the first is still running it"
            )
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("LAFTER_STORAGE_BACKEND=s3 needs LAFTER_S3_BUCKET")
        if self.env == "production":
            self.check_production()
        return self

    @model_validator(mode="after")
    def _liveness(self) -> Settings:
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(
                "LAFTER_HEARTBEAT_TIMEOUT_S must exceed twice LAFTER_HEARTBEAT_INTERVAL_S, or the reaper "
                "takes live jobs for lost ones"
            )
        return self

    def check_production(self) -> None:
        """Refuse the embedded defaults where they would lose data or jobs under load."""
        problems = []
        if self.is_sqlite:
            problems.append("LAFTER_DATABASE_URL is SQLite; production needs PostgreSQL")
        if self.broker_url.startswith("filesystem"):
            problems.append("LAFTER_BROKER_URL is the filesystem transport; production needs Redis")
        if self.auth == "off":
            problems.append("LAFTER_AUTH is off; production needs API keys (LAFTER_AUTH=on)")
        if self.allow_any_model_path:
            problems.append(
                "LAFTER_ALLOW_ANY_MODEL_PATH is on; production serves models only from "
                "LAFTER_LOCAL_MODEL_DIRS and open_clip's pretrained tags"
            )
        if problems:
            raise ValueError("refusing to start in production mode: " + "; ".join(problems))

    @property
    def metrics_access(self) -> Literal["open", "token", "off"]:
        """Who may read /metrics: anyone, holders of LAFTER_METRICS_TOKEN, or no one."""
        if self.metrics_token is not None and self.metrics_token.get_secret_value():
            return "token"
        return "off" if self.env == "production" else "open"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def blob_dir(self) -> Path:
        assert self.storage_dir is not None
        return self.storage_dir


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once. Tests that change the environment call ``cache_clear``."""
    return Settings()
