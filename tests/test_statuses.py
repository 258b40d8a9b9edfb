"""Job statuses are defined once (jobs/status.py) and every reader agrees with it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

from evosparse.jobs import status

ROOT = Path(__file__).resolve().parents[1]


def test_tables_schema_client_and_page_use_the_one_definition() -> None:
    from evosparse.api.schemas import JobOut
    from evosparse.jobs import client, models

    assert models.STATUSES is status.STATUSES and models.TERMINAL is status.TERMINAL
    assert client.TERMINAL is status.TERMINAL
    assert get_args(JobOut.model_fields["status"].annotation) == status.STATUSES
    # the dashboard is static JavaScript: it cannot import the set, so it is checked here
    js = (ROOT / "api" / "static" / "app.js").read_text()
    terminal = re.search(r"const TERMINAL = new Set\(\[([^\]]*)\]\)", js)
    assert terminal and set(re.findall(r'"([A-Z]+)"', terminal.group(1))) == status.TERMINAL


def test_the_client_knows_statuses_without_the_server_stack() -> None:
    code = ("import sys, evosparse.jobs.client\n"
            "assert not {'sqlalchemy', 'fastapi', 'pydantic_settings', 'torch'} & set(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
