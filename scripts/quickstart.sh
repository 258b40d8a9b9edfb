#!/usr/bin/env bash
# The README's first command. Installs evosparse and its dependencies (scripts/install.sh), then runs
# scripts/demo.py: start the one-machine service on loopback, submit a job over the REST API that
# prunes SmolLM2-135M to 60 % with the evolutionary search, follow it, print the results, stop.
# Extra arguments go to demo.py (python3 scripts/demo.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
echo "==> installing (scripts/install.sh)"
bash scripts/install.sh
echo "==> installed in $(( $(date +%s) - start )) s; running the demo (scripts/demo.py)"
${PYTHON:-python3} scripts/demo.py "$@"
echo "==> quickstart finished in $(( $(date +%s) - start )) s"
