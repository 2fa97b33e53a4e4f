#!/usr/bin/env bash
# Quickstart, command 1: install (first time only), then run the whole stack with the demo model.
# Any arguments go to `inferq up` (--port, --workers, --data-dir, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/inferq up "$@"
