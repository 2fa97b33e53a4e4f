#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs inferq into it; fast when nothing changed.
# torch 2.13.0 goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
stamp=".venv/.inferq-installed${EXTRAS:+-$EXTRAS}"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)-${TORCH_VERSION:-2.13.0}"

for s in "$stamp" .venv/.inferq-installed-dev; do  # a dev install also serves a plain one
  if [ -f "$s" ] && [ "$(cat "$s")" = "$want" ]; then
    exit 0
  fi
done
step() { printf '\033[1m▸ %s\033[0m\n' "$*" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
step "installing torch ${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet --progress-bar off "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -c "import torch" >/dev/null
step "installing inferq${EXTRAS:+[$EXTRAS]} and its dependencies"
.venv/bin/python -m pip install --quiet --progress-bar off -e ".${EXTRAS:+[$EXTRAS]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -c "import api, worker, shared, inferq.cli" >/dev/null
echo "$want" > "$stamp"
