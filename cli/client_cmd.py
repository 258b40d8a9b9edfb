"""The client verbs: `evosparse submit|status|list|cancel|download`, against a running server.

Made for pipelines: with ``--json`` stdout carries exactly one JSON document (the API's own shape);
without it, `submit` prints the job id alone on stdout as soon as the job exists, and everything
else goes to stderr. Exit codes: 0 done, 1 the job FAILED, 2 a usage error or a refusal by the
server, 3 the job was CANCELLED, 4 `--wait` timed out. Needs only the base install.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from evosparse.cli.spec_flags import add_spec_arguments, build_spec
from evosparse.jobs.client import (
    Client,
    ClientSettings,
    JobCancelled,
    JobFailed,
    WaitTimeout,
)
from evosparse.jobs.listing import DEFAULT_SORT, SORT_KEYS
from evosparse.jobs.status import STATUSES
from evosparse.pruning.errors import EvosparseError
from pydantic import BaseModel

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_TIMEOUT = 0, 1, 2, 3, 4


class ClientCommandError(EvosparseError):
    """A client verb cannot go on: no key, or the server cannot be reached."""


def _server_options(parser: argparse.ArgumentParser) -> None:
    env = ClientSettings.from_env()
    c = parser.add_argument_group("server")
    c.add_argument("--server", default=env.server, help="server URL (default: $EVOSPARSE_SERVER or %(default)s)")
    c.add_argument("--key", default=env.api_key, help="API key (default: $EVOSPARSE_API_KEY)")
    c.add_argument("--json", action="store_true", help="print one JSON document on stdout (the API's shape)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit a pruning job to a server (optionally wait and download)",
                       description="Submit one pruning job to an evosparse server. Every job-spec field is a "
                                   "flag (the same fields POST /v1/jobs takes). The job id goes to stdout.")
    add_spec_arguments(p, help_overrides={"model": "'smollm2-135m', a hub id, or a path the server may read "
                                                    "(a local path is sent absolute)"})
    _server_options(p)
    w = p.add_argument_group("waiting")
    w.add_argument("--wait", action="store_true", help="wait for the job; exit 0 done, 1 failed, 3 cancelled, "
                                                      "4 timeout")
    w.add_argument("--timeout", type=float, help="seconds to wait (with --wait); none: no limit")
    w.add_argument("--cancel-on-timeout", action="store_true",
                   help="cancel the job when --timeout passes (else it keeps running on the server)")
    w.add_argument("--out", help="download the artifacts here when it succeeds (implies --wait)")
    w.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    w.add_argument("--webhook-url", help="receives the signed job.finished event")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_submit)

    s = sub.add_parser("status", help="one job's state (progress, generation, fitness, error)")
    s.add_argument("job_id")
    _server_options(s)
    s.set_defaults(func=cmd_status)

    ls = sub.add_parser("list", help="the team's jobs, newest first; filter by status, name, label or text")
    ls.add_argument("--status", choices=STATUSES, help="jobs in this state")
    ls.add_argument("--name", help="jobs with exactly this name")
    ls.add_argument("--label", action="append", default=[], metavar="KEY[=VALUE]",
                    help="jobs with this label (value); repeat to require several")
    ls.add_argument("--search", help="start of the id, or part of the name or model")
    ls.add_argument("--sort", default=DEFAULT_SORT, choices=[p + k for k in SORT_KEYS for p in ("", "-")],
                    metavar="[-]COLUMN", help=f"one of {', '.join(SORT_KEYS)}; '-' in front: descending")
    ls.add_argument("--limit", type=int, default=50, help="jobs per page (the server caps it)")
    ls.add_argument("--offset", type=int, default=0, help="jobs to skip (the next page)")
    _server_options(ls)
    ls.set_defaults(func=cmd_list)

    c = sub.add_parser("cancel", help="cancel a job (a queued one at once, a running one within a generation)")
    c.add_argument("job_id")
    _server_options(c)
    c.set_defaults(func=cmd_cancel)

    d = sub.add_parser("download", help="download a finished job's artifacts, each SHA-256 checked")
    d.add_argument("job_id")
    d.add_argument("--out", required=True, help="folder to write the files to")
    _server_options(d)
    d.set_defaults(func=cmd_download)


def _client(args: argparse.Namespace) -> Client:
    if not args.key:
        raise ClientCommandError("no API key: pass --key or set EVOSPARSE_API_KEY (create one with "
                                 "`evosparse keys create --team NAME`)")
    return Client(args.server, args.key)


def _emit(args: argparse.Namespace, document: Any, text: str | None = None) -> None:
    """With --json: the document on stdout; without: ``text`` (if any) on stdout."""
    if args.json:
        data = document.model_dump(mode="json") if isinstance(document, BaseModel) else document
        print(json.dumps(data))
    elif text is not None:
        print(text)
    sys.stdout.flush()


def _talk(args: argparse.Namespace, fn):  # noqa: ANN001, ANN202 - runs fn(client), naming an unreachable server
    try:
        with _client(args) as client:
            return fn(client)
    except httpx.TransportError as exc:
        raise ClientCommandError(f"cannot reach the server at {args.server}: {exc}") from None


# --- submit -------------------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    local = Path(spec.model).expanduser()
    if local.exists():  # the server needs an absolute path (it checks it against its allowed folders)
        spec = spec.model_copy(update={"model": str(local.resolve())})
    return _talk(args, lambda client: _submit_and_follow(client, spec, args))


def _submit_and_follow(client: Client, spec, args: argparse.Namespace) -> int:  # noqa: ANN001
    sub = client.submit(spec, idempotency_key=args.idempotency_key, webhook_url=args.webhook_url)
    print(f"job {sub.id} {sub.status}", file=sys.stderr)
    if not args.json:
        _emit(args, None, sub.id)  # at once: a pipeline has the id even if it is killed while waiting
    if not (args.wait or args.out):
        if args.json:
            _emit(args, sub)
        return EXIT_OK
    bar = None if args.quiet or args.json else _ProgressBar()
    try:
        job = client.wait(sub.id, timeout=args.timeout, on_update=bar.update if bar else None)
    except WaitTimeout as exc:
        job = exc.job
        print(f"evosparse: {exc}", file=sys.stderr)
        if args.cancel_on_timeout:
            job = client.cancel(sub.id)
            print(f"evosparse: job {sub.id} cancelled (--cancel-on-timeout)", file=sys.stderr)
        _emit(args, job)
        return EXIT_TIMEOUT
    except JobFailed as exc:
        print(f"evosparse: job failed: {exc.job.error}", file=sys.stderr)
        _emit(args, exc.job)
        return EXIT_FAILED
    except JobCancelled as exc:
        print(f"evosparse: job {sub.id} was cancelled", file=sys.stderr)
        _emit(args, exc.job)
        return EXIT_CANCELLED
    finally:
        if bar:
            bar.close()
    if args.out:
        dest = client.download(sub.id, args.out)
        print(f"artifacts downloaded to {dest}", file=sys.stderr)
    _emit(args, job)
    return EXIT_OK


class _ProgressBar:
    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(self, job) -> None:  # noqa: ANN001 - a JobOut
        self.bar.n = int(1000 * (job.progress or 0.0))
        desc = job.status if job.status != "RUNNING" else (job.stage or "running")
        self.bar.set_description(desc[:20])
        post = []
        if job.generation is not None:
            post.append(f"gen {job.generation}/{job.generations_total or '?'}")
        if job.best_fitness is not None:
            post.append(f"best {job.best_fitness:.4g}")
        self.bar.set_postfix_str(" ".join(post))

    def close(self) -> None:
        self.bar.close()


# --- status, list, cancel, download ---------------------------------------------------------------

def _describe(job) -> str:  # noqa: ANN001 - a JobOut
    spec = job.spec
    lines = [f"job        {job.id}" + (f"  ({job.name})" if job.name else ""),
             f"status     {job.status}" + (f"  {job.stage or ''} {round(100 * job.progress)} %"
                                           if job.status == "RUNNING" else ""),
             f"model      {spec.get('model')}  sparsity {spec.get('sparsity')}  {spec.get('pruner')} / "
             f"{spec.get('allocation')}"]
    if job.labels:
        lines.append("labels     " + " ".join(f"{k}={v}" for k, v in sorted(job.labels.items())))
    if job.generation is not None:
        lines.append(f"generation {job.generation}/{job.generations_total or '?'}  best fitness {job.best_fitness}")
    if job.report and job.report.get("perplexity"):
        ppl = job.report["perplexity"]
        lines.append(f"perplexity dense {ppl.get('dense')} -> pruned {ppl.get('pruned')}")
    if job.error:
        lines.append(f"error      {job.error}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    job = _talk(args, lambda client: client.get(args.job_id))
    _emit(args, job, _describe(job))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    if not (1 <= args.limit <= 1000) or args.offset < 0:
        raise ClientCommandError("--limit must be 1-1000 and --offset >= 0")
    page = _talk(args, lambda client: client.list(args.status, args.limit, args.offset, name=args.name,
                                                  labels=args.label, search=args.search, sort=args.sort))
    rows = [f"{'id':32}  {'status':9}  {'progress':>8}  {'name':24}  model"]
    rows += [f"{j.id:32}  {j.status:9}  {round(100 * j.progress):>7}%  {(j.name or '-')[:24]:24}  "
             f"{j.spec.get('model')}" for j in page.items]
    rows.append(f"({len(page.items)} of {page.total})")
    _emit(args, page, "\n".join(rows))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _talk(args, lambda client: client.cancel(args.job_id))
    print(f"job {job.id} {job.status}" + (" (cancel requested)" if job.status == "RUNNING" else ""),
          file=sys.stderr)
    _emit(args, job)
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    def fetch(client: Client) -> dict:
        arts = client.artifacts(args.job_id)
        if not arts:
            job = client.get(args.job_id)
            raise ClientCommandError(f"job {job.id} is {job.status}: it has no artifacts to download")
        dest = client.download(args.job_id, args.out)
        return {"id": args.job_id, "out": str(dest.resolve()), "files": [a.model_dump(mode="json") for a in arts]}

    done = _talk(args, fetch)
    print(f"{len(done['files'])} files downloaded to {done['out']}", file=sys.stderr)
    _emit(args, done)
    return EXIT_OK

