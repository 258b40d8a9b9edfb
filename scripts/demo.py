#!/usr/bin/env python3
"""The quickstart demo: the one-machine service, used the way a team would use it.

1. starts ``evosparse serve`` in the background on loopback with a fresh data folder
   (SQLite, local artifact store, embedded Redis, one worker);
2. creates an API key (``evosparse keys create``);
3. submits, through the REST API (jobs.client), a job that prunes SmolLM2-135M to 60 % with the
   evolutionary search, and shows a progress bar while it runs (the dashboard shows it too);
4. prints dense / uniform / searched perplexity on held-out text and the search time, downloads
   the pruned checkpoint (SHA-256 checked) and says where it is;
5. stops the service (unless --keep-serving).

The search settings are sized to finish in about 10 minutes on a 2-core CPU machine; a GPU or
more cores make it faster, and --generations/--offspring make it better.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TEAM = "quickstart"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--pruner", default="wanda")
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--offspring", type=int, default=8)
    p.add_argument("--selection", default="256:2,1024:1",
                   help="multi-fidelity stages tokens:survivors (see the README)")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows of --seq-len tokens")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out evaluation windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--time-budget", type=float, default=4.0,
                   help="minutes the search may take at most (it stops early, keeping its best)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=ROOT / "var" / "quickstart",
                   help="service data folder; emptied first so every run starts fresh")
    p.add_argument("--out", type=Path, default=None,
                   help="where the pruned checkpoint goes (default: out/<model>-<pct>-evolutionary)")
    p.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    p.add_argument("--timeout", type=float, default=3600, help="give up waiting after this many seconds")
    p.add_argument("--keep-serving", action="store_true",
                   help="leave the service running at the end (explore the dashboard; Ctrl-C stops it)")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evosparse_cmd() -> list[str]:
    # The same interpreter as this script, run from the checkout: what quickstart.sh installed.
    return [sys.executable, "-m", "evosparse.cli.main"]


class Service:
    """`evosparse serve` as a child process in its own session, so it and its children stop together."""

    def __init__(self, data_dir: Path, port: int):
        self.data_dir, self.port = data_dir, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = data_dir / "serve.log"
        self.env = dict(os.environ, EVOSPARSE_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        import httpx

        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(
            [*evosparse_cmd(), "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--api-workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the service did not answer on {self.url} within {timeout:.0f} s; see {self.log_path}")

    def create_key(self) -> str:
        out = subprocess.run([*evosparse_cmd(), "keys", "create", "--team", TEAM], env=self.env, cwd=ROOT,
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"`evosparse keys create` failed: {out.stderr.strip()}")
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM lets `evosparse serve` stop its worker, API and Redis itself; then make sure.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Progress:
    """One status line for the job: a bar for its overall progress, its stage and search generation.

    On a terminal the line is redrawn in place; in a log (not a TTY) a line is printed whenever the
    stage or generation changes.
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.tty = sys.stdout.isatty()
        self.width = 0
        self.key: tuple = ()

    def update(self, job) -> None:  # noqa: ANN001 - a JobOut
        frac = float(job.progress or 0.0)
        filled = int(round(30 * frac))
        stage = job.status if job.status != "RUNNING" else (job.stage or "running")
        extra = ""
        if stage == "allocation" and job.generation is not None:
            extra = f"  gen {job.generation}/{job.generations_total or '?'}"
            if job.best_fitness is not None:
                extra += f"  best KL {job.best_fitness:.4f}"
        elapsed = (time.monotonic() - self.t0) / 60
        eta = f", ~{job.eta_seconds / 60:.1f} min left" if job.eta_seconds else ""
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * frac:5.1f} %  {stage:<16}{extra}  ({elapsed:.1f} min{eta})"
        if self.tty:
            sys.stdout.write("\r" + line.ljust(self.width))
            sys.stdout.flush()
            self.width = len(line)
        elif (stage, job.generation) != self.key:
            print(line, flush=True)
        self.key = (stage, job.generation)

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from evosparse.jobs.client import Client
    from evosparse.jobs.spec import JobSpec

    t_start = time.monotonic()
    pct = round(args.sparsity * 100)
    out = args.out or ROOT / "out" / f"{Path(args.model).name}-{pct}-evolutionary"
    if args.data_dir.exists():
        shutil.rmtree(args.data_dir)  # a fresh service: new database, store and broker
    args.data_dir.mkdir(parents=True)
    service = Service(args.data_dir.resolve(), args.port or free_port())

    spec = JobSpec(
        model=args.model, sparsity=args.sparsity, pruner=args.pruner, allocation="evolutionary",
        calib_windows=args.calib_windows, eval_windows=args.eval_windows, seq_len=args.seq_len, seed=args.seed,
        search={"generations": args.generations, "offspring": args.offspring, "selection": args.selection,
                "seed_from": "fisher", "fitness": "kl", "time_budget_min": args.time_budget},
    )
    print(f"==> starting the service: evosparse serve --port {service.port} --data-dir {service.data_dir}")
    try:
        service.start()
        key = service.create_key()
        print(f"==> API key for team {TEAM!r} created; dashboard: {service.url}/  (paste the key there)")
        print(f"    export EVOSPARSE_API_KEY={key}")
        with Client(service.url, key) as client:
            sub = client.submit(spec)
            job_id = sub.id
            print(f"==> job {job_id} submitted: prune {args.model} to {pct} % with {args.pruner} + evolutionary "
                  f"search ({args.generations} generations x {args.offspring} offspring, at most "
                  f"{args.time_budget:g} min of search)")
            print(f"    follow it: {service.url}/#/jobs/{job_id}   or   curl -H \"Authorization: Bearer "
                  f"$EVOSPARSE_API_KEY\" {service.url}/v1/jobs/{job_id}")
            bar = Progress()
            try:
                job = client.wait(job_id, timeout=args.timeout, poll_s=1.0, max_poll_s=2.0, on_update=bar.update,
                                  raise_on_failure=False)
            finally:
                bar.close()
            if job.status != "SUCCEEDED":
                print(f"==> job {job.status}: {job.error}", file=sys.stderr)
                print(f"    service log: {service.log_path}", file=sys.stderr)
                return 1
            if out.exists():
                shutil.rmtree(out)
            client.download(job_id, out)
        report = job.report
        print_results(report, job, out, time.monotonic() - t_start)
        if args.keep_serving:
            print(f"==> the service keeps running at {service.url}/ ; Ctrl-C stops it")
            try:
                while service.proc and service.proc.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    except KeyboardInterrupt:
        print("\n==> interrupted", file=sys.stderr)
        return 130
    finally:
        print("==> stopping the service")
        service.stop()


def print_results(report: dict, job, out: Path, wall_s: float) -> None:  # noqa: ANN001 - a JobOut
    ppl = report["perplexity"]
    search = report.get("search", {})
    timings = report.get("timings", {})
    target = report.get("sparsity_target", job.spec["sparsity"])
    rows = [
        ("dense", "0.0 %", f"{ppl['dense']:.2f}", "1.00"),
        (f"uniform ({report['pruner']})", f"{100 * target:.1f} %", f"{ppl['uniform']:.2f}",
         f"{ppl['uniform'] / ppl['dense']:.2f}"),
        (f"searched ({report['pruner']} + evolutionary)", f"{100 * report['global_sparsity']:.1f} %",
         f"{ppl['pruned']:.2f}", f"{ppl['pruned'] / ppl['dense']:.2f}"),
    ]
    print()
    print(f"Perplexity on held-out text ({report.get('eval_tokens', '?')} tokens of {job.spec['eval']}, "
          f"second half; calibration on the first half):")
    print(table(rows, ("model", "sparsity", "perplexity", "x dense")))
    print()
    change = (ppl["pruned"] - ppl["uniform"]) / ppl["uniform"] * 100
    print(f"at the same sparsity the searched allocation's perplexity is {abs(change):.1f} % "
          f"{'lower' if change < 0 else 'higher'} than uniform's ({ppl['pruned']:.2f} vs {ppl['uniform']:.2f})")
    print(f"search time: {search.get('seconds', timings.get('search', float('nan'))):.0f} s "
          f"({len(search.get('history', []))} generations, {search.get('candidates_scored', '?')} candidates scored)"
          f"; whole job {timings.get('total', float('nan')):.0f} s; demo wall time {wall_s:.0f} s")
    print(f"pruned checkpoint: {out}  (report.json inside; load with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    sys.exit(main())
