"""Request/response shapes of the REST API (the JobSpec itself lives in jobs.spec)."""

from __future__ import annotations

from typing import Any

from evosparse.jobs.netguard import UrlRefused
from evosparse.jobs.netguard import parse as parse_url
from evosparse.jobs.spec import JobSpec
from evosparse.jobs.status import Status
from pydantic import BaseModel, ConfigDict, Field, field_validator


class JobSubmit(JobSpec):
    """POST /v1/jobs body: a JobSpec plus where to send the completion webhook."""

    model_config = ConfigDict(extra="forbid")

    webhook_url: str | None = Field(None, max_length=2000, description=(
        "http(s) URL on a public host that receives the signed job.finished event (README, Webhooks)"))

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook(cls, v: str | None) -> str | None:
        # Form only (422); whether the host may be called is decided by the route (400, with DNS).
        if v is not None:
            try:
                parse_url(v)
            except UrlRefused as exc:
                raise ValueError(str(exc)) from None
        return v

    def job_spec(self) -> JobSpec:
        return JobSpec.model_validate(self.model_dump(exclude={"webhook_url"}))


class Submitted(BaseModel):
    id: str
    status: Status
    location: str


class JobOut(BaseModel):
    id: str
    status: Status
    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    spec: dict[str, Any]
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    progress: float
    stage: str | None
    message: str | None = None
    generation: int | None
    generations_total: int | None
    best_fitness: float | None
    eta_seconds: float | None
    error: str | None
    attempts: int
    worker: str | None
    cancel_requested: bool = False
    webhook_status: str | None = None
    report: dict[str, Any] | None


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class GenerationOut(BaseModel):
    generation: int
    best: float | None
    mean: float | None
    val: float | None = None  # the parent on the held-out validation windows (search.validation_windows)
    tokens: int | None
    seconds: float | None
    best_vector: list[float] | None
    attempt: int | None = None


class GenerationList(BaseModel):
    items: list[GenerationOut]


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class ArtifactList(BaseModel):
    items: list[ArtifactOut]
