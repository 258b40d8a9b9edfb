"""Real servers for the service tests, all on loopback: SeaweedFS (S3 API), a Celery worker, uvicorn.

Ports are picked free at run time (never the defaults), and every process is stopped by the
fixture that started it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

S3_ACCESS_KEY = "evsaccess"
S3_SECRET_KEY = "evssecret-0123456789"


def free_port(avoid: set[int] | None = None) -> int:
    """A free TCP port whose +10000 sibling (SeaweedFS gRPC convention) is free too."""
    avoid = avoid or set()
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in avoid or port + 10000 > 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        avoid.add(port)
        return port
    raise RuntimeError("no free port pair")


def wait_until(check, timeout: float, what: str, interval: float = 0.2):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last error: {last!r})")


class Weed:
    """`weed server` with master, volume, filer and S3 gateway; S3 auth with one access key."""

    def __init__(self, root: Path):
        self.root = root
        used: set[int] = set()
        self.ports = {name: free_port(used) for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Weed:
        data = self.root / "weed-data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "evosparse", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.ports
        cmd = ["weed", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
               "-filer", "-s3", f"-s3.port={p['s3']}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.volumeSizeLimitMB=32", "-volume.max=300"]
        self.log = open(self.root / "weed.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                              config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.root / 'weed.log').read_text()[-2000:]}")
            client.list_buckets()
            return True

        wait_until(ready, timeout, "SeaweedFS S3 gateway")
        return self

    def create_bucket(self, name: str) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
                              config=Config(s3={"addressing_style": "path"}))
        wait_until(lambda: client.create_bucket(Bucket=name) or True, 30, f"bucket {name}")
        # Volumes are allocated lazily; the first write can fail for a moment right after start.
        wait_until(lambda: client.put_object(Bucket=name, Key="_probe", Body=b"x") or True, 60, "first write")
        client.delete_object(Bucket=name, Key="_probe")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM the process group we created, then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class CeleryWorker:
    """A real `celery worker` subprocess (its own process group, so SIGKILL reaches the pool child too)."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str, webhooks: bool = False):
        self.env, self.log_path, self.name, self.webhooks = env, log_path, name, webhooks
        self.proc: subprocess.Popen | None = None

    def start(self) -> CeleryWorker:
        from evosparse.cli.service_cmd import celery_worker_cmd

        self.log = open(self.log_path, "a")
        queue = self.env.get("EVOSPARSE_QUEUE", "evosparse")
        if self.webhooks:
            queue = self.env.get("EVOSPARSE_WEBHOOK_QUEUE") or f"{queue}.webhooks"
        cmd = celery_worker_cmd(queue, f"{self.name}@%h", webhooks=self.webhooks)
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(self.log_path.parent))
        return self

    def sigkill(self) -> None:
        """Kill the worker and its pool child at once: no warm shutdown, no ack, no cleanup."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        stop_process(self.proc, grace=15)
        if not self.log.closed:
            self.log.close()


class ApiServer:
    """The real FastAPI app served by uvicorn on a loopback port, in a thread of the test process."""

    def __init__(self, settings):  # noqa: ANN001
        import uvicorn
        from evosparse.api.main import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ApiServer:
        import httpx

        self.thread.start()
        wait_until(lambda: httpx.get(self.url + "/healthz", timeout=2).status_code == 200, 30, "API")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def python() -> str:
    return sys.executable
