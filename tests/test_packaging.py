"""A non-editable `pip install .` lives under the one name `evosparse` and collides with nothing.

Built into a fresh virtual environment (base install: the client and the CLI, no torch), then
used from a folder holding a pipeline's own `api/` and `jobs/` packages, as a release pipeline
would: both sides import what they own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    # pip builds in the source tree (build/, *.egg-info): build from a copy of the sources instead
    src = tmp_path_factory.mktemp("src") / "evosparse"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "tests", "bench", ".*_cache"))
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "Could not find a version" in res.stderr + res.stdout:
        pytest.skip(f"no package index reachable: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-2000:]
    return env_dir


def test_install_puts_one_name_in_site_packages(venv: Path) -> None:
    site = next((venv / "lib").glob("python3*/site-packages"))
    ours = {p.name for p in site.iterdir()} & {"api", "cli", "jobs", "pruning", "search", "worker"}
    assert not ours, f"generic top-level packages installed: {ours}"
    assert (site / "evosparse" / "api" / "main.py").is_file()
    assert (site / "evosparse" / "jobs" / "migrations" / "versions").is_dir()
    assert (site / "evosparse" / "api" / "static" / "index.html").is_file()
    assert not (site / "torch").exists(), "the base install must not pull torch"


def test_no_shadowing_either_way(venv: Path, tmp_path: Path) -> None:
    for pkg in ("api", "jobs"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f"OWNER = 'pipeline-{pkg}'\n")
    (tmp_path / "jobs" / "client.py").write_text("class Client:\n    OWNER = 'pipeline'\n")
    script = textwrap.dedent("""
        import api, jobs
        from jobs.client import Client as TheirClient
        import evosparse
        from evosparse import Client, JobSpec
        assert api.OWNER == "pipeline-api" and jobs.OWNER == "pipeline-jobs", "evosparse shadowed them"
        assert TheirClient.OWNER == "pipeline"
        assert Client.__module__ == "evosparse.jobs.client", Client.__module__
        assert "site-packages" in evosparse.__file__
        JobSpec(sparsity=0.5)
        print("OK", evosparse.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK ")
    cli = subprocess.run([str(venv / "bin" / "evosparse"), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "prune" in cli.stdout and "submit" in cli.stdout


def test_base_install_cli_generates_flags_and_names_the_missing_extra(venv: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    exe = str(venv / "bin" / "evosparse")
    helped = subprocess.run([exe, "submit", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "--sensitivity-spread" in helped.stdout and "--max-level-delta" in helped.stdout
    # `prune` needs torch: without the [worker] extra it says so in one line, no traceback
    run = subprocess.run([exe, "prune", "smollm2-135m", "--sparsity", "0.5", "--out", str(tmp_path / "o")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "evosparse[worker]" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()
    # `evosparse submit --wait` draws its progress bar with the base install alone
    bar = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "from evosparse.api.schemas import JobOut\n"
                          "from evosparse.cli.client_cmd import _ProgressBar\n"
                          "job = JobOut(id='j', status='RUNNING', spec={}, created_at=None, started_at=None,"
                          " finished_at=None, progress=0.5, stage='search', generation=3, generations_total=9,"
                          " best_fitness=0.25, eta_seconds=None, error=None, attempts=1, worker=None, report=None)\n"
                          "b = _ProgressBar(); b.update(job); b.close()"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert bar.returncode == 0, bar.stderr
