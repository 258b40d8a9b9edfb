"""The production docker-compose.yml and image recipes: validated by the Compose client where it is
installed, and checked structurally (services, health checks, volumes, GPU reservation, settings)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse docker-compose.yml (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
LONG_RUNNING = ("postgres", "redis", "minio", "api", "worker", "webhooks")
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
           "EVOSPARSE_S3_ACCESS_KEY", "EVOSPARSE_S3_SECRET_KEY", "EVOSPARSE_METRICS_TOKEN")


def _compose_cli() -> list[str] | None:
    """The Compose v1 binary (Debian's docker-compose) or the v2 plugin, whichever works."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_config(cli: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # Only the given variables: a developer's own .env or environment must not change the result.
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("EVOSPARSE_")}
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return subprocess.run([*cli, "-f", str(COMPOSE), "--project-directory", str(tmp_path), "--env-file",
                           str(env_file), "config"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=clean)


def test_compose_refuses_to_start_without_real_secrets(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose client installed (apt-get install -y docker-compose)")
    secrets = {k: f"not-a-default-{i}" for i, k in enumerate(SECRETS)}
    for missing in SECRETS:
        proc = _compose_config(cli, tmp_path, {k: v for k, v in secrets.items() if k != missing})
        assert proc.returncode != 0 and missing in proc.stderr, (missing, proc.stderr[-500:])


def test_no_default_passwords_and_redis_has_one(compose: dict) -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        assert f"${{{name}:-" not in text, f"{name} has a default"
    assert "--requirepass" in " ".join(compose["services"]["redis"]["command"])
    env = compose["x-evosparse-env"]
    assert "${REDIS_PASSWORD:?" in env["EVOSPARSE_BROKER_URL"]
    # the services use the bucket-scoped key that minio-init creates, not MinIO's root account
    assert "MINIO_ROOT" not in env["EVOSPARSE_S3_ACCESS_KEY_ID"] + env["EVOSPARSE_S3_SECRET_ACCESS_KEY"]
    assert "policy attach" in " ".join(compose["services"]["minio-init"]["command"])


def test_compose_config_validates_with_the_compose_client(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose client installed (apt-get install -y docker-compose)")
    proc = _compose_config(cli, tmp_path, {k: f"value-{i}" for i, k in enumerate(SECRETS)})
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert set(LONG_RUNNING) <= set(resolved["services"])
    # The client resolves the shared env anchor: both app services must get the database URL.
    for name in ("api", "worker"):
        env = resolved["services"][name]["environment"]
        assert env["EVOSPARSE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["EVOSPARSE_DATABASE_URL"]


def test_every_long_running_service_has_a_healthcheck(compose: dict) -> None:
    services = compose["services"]
    for name in LONG_RUNNING:
        assert name in services, f"service {name} missing"
        check = services[name].get("healthcheck")
        assert check and check.get("test"), f"service {name} has no health check"
        assert not check.get("disable", False)


def test_state_lives_in_named_volumes(compose: dict) -> None:
    declared = set(compose.get("volumes") or {})
    wanted = {"postgres": "/var/lib/postgresql/data", "redis": "/data", "minio": "/data"}
    for service, target in wanted.items():
        mounts = compose["services"][service].get("volumes", [])
        sources = [m.split(":", 1)[0] for m in mounts if isinstance(m, str) and m.split(":")[1] == target]
        assert sources, f"{service} keeps {target} in no volume"
        assert sources[0] in declared, f"{service} mounts {sources[0]!r}, not a named volume"


def test_worker_reserves_one_gpu_and_runs_one_task_at_a_time(compose: dict) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    dev = devices[0]
    assert dev["driver"] == "nvidia"
    assert "gpu" in dev["capabilities"]
    # exactly one GPU, either by count or by id
    assert dev.get("count") == 1 or len(dev.get("device_ids", [])) == 1
    command = " ".join(worker["command"]) if isinstance(worker["command"], list) else worker["command"]
    assert "--concurrency=1" in command
    assert "--prefetch-multiplier=1" in command


def test_api_runs_migrations_before_serving(compose: dict) -> None:
    api = compose["services"]["api"]
    command = " ".join(api["command"]) if isinstance(api["command"], list) else api["command"]
    # `evosparse migrate` is the one place migrations run (evosparse.jobs.db.migrate), then the API
    assert "evosparse migrate" in command and "evosparse.api.main" in command
    assert command.index("evosparse migrate") < command.index("uvicorn")
    # and waits for its dependencies to be healthy rather than merely started
    for dep in ("postgres", "redis"):
        assert api["depends_on"][dep]["condition"] == "service_healthy"


def _dockerfile(name: str) -> str:
    return (ROOT / "docker" / name).read_text()


@pytest.mark.parametrize(
    ("name", "extra", "torch_index"),
    [("Dockerfile.api", "server", None), ("Dockerfile.worker", "worker", "whl/cu")],
)
def test_dockerfiles_are_honest(name: str, extra: str, torch_index: str | None) -> None:
    text = _dockerfile(name)
    assert re.search(r"^FROM python:3\.1\d-slim\b", text, re.M)
    assert f'pip install ".[{extra}]"' in text, f"{name} should install the [{extra}] extra"
    if torch_index is None:  # the API never runs ML work: its image carries no torch at all
        assert "torch" not in text.replace("no torch", "")
    else:
        assert torch_index in text, f"{name} should install torch from the {torch_index} index"
    # every COPY source exists in the repository, so `docker build` would not fail on a missing path
    for line in text.splitlines():
        m = re.match(r"COPY\s+(.+)\s+\S+$", line.strip())
        if m:
            for src in m.group(1).split():
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"


def test_compose_env_vars_are_settings_the_service_reads(compose: dict) -> None:
    from evosparse.jobs.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "EVOSPARSE_").upper()
    known = {prefix + name.upper() for name in Settings.model_fields}
    for service in ("api", "worker", "webhooks"):
        env = compose["services"][service]["environment"]
        ours = {k for k in env if k.startswith(prefix)}
        unknown = sorted(ours - known - {"EVOSPARSE_CACHE"})  # EVOSPARSE_CACHE is read by pruning/config.py
        assert not unknown, f"{service} sets {unknown}, which jobs.settings.Settings does not read"
