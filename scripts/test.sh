#!/usr/bin/env bash
# Quickstart, command 2: install (first time only) with the dev tools, lint, type-check, run the tests.
# The tests use INFERQ_TEST_REDIS_URL / INFERQ_TEST_DATABASE_URL when set, embedded servers otherwise.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
step() { printf '\033[1m▸ %s\033[0m\n' "$*" >&2; }
step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null
step "mypy --strict"
.venv/bin/mypy
step "fetching the demo model (first time only)"
.venv/bin/inferq model fetch >/dev/null
step "pytest"
exec .venv/bin/python -m pytest "$@"
