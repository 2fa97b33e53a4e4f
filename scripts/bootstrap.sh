#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs inferq into it; fast when nothing changed.
# torch 2.13.0 goes in first, the CPU build on a machine without an NVIDIA GPU (scripts/torch_source.sh):
# a bare `torch` requirement would pull PyPI's multi-GB CUDA build.
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
# pip with a live line: elapsed time and what pip is on now (a TTY), or a line every 15 s (a log).
# On failure it shows pip's output, unless quiet_fail is set (a failure the caller recovers from).
pip_install() {
  local log t0 pid last=0 now what
  log=$(mktemp)
  t0=$SECONDS
  .venv/bin/python -m pip install --progress-bar off "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    now=$((SECONDS - t0))
    # Nothing matches until pip prints its first line: not a failure (set -e and pipefail are on).
    what=$( (grep -E '^(Collecting|Downloading|Processing|Installing|Building|Obtaining)' "$log" || true) | tail -1 | cut -c1-60)
    if [ -t 2 ]; then
      printf '\r\033[K  %3ds  %s' "$now" "$what" >&2
    elif [ $((now - last)) -ge 15 ]; then
      printf '  %3ds  %s\n' "$now" "$what" >&2
      last=$now
    fi
  done
  [ -t 2 ] && printf '\r\033[K' >&2
  if ! wait "$pid"; then
    [ -n "${quiet_fail:-}" ] || grep -v "^WARNING: Location" "$log" >&2
    rm -f "$log"
    return 1
  fi
  printf '  done in %ds\n' $((SECONDS - t0)) >&2
  rm -f "$log"
}
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
torch_req="torch==${TORCH_VERSION:-2.13.0}"
read -r index why < <(PYTHON=$PY bash scripts/torch_source.sh) || true
host() { printf '%s' "$1" | sed -E 's#^[a-z+]+://([^/]+).*#\1#'; }
from="from pip's default index"
if .venv/bin/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("torch").split("+")[0] != sys.argv[1])' \
  "${TORCH_VERSION:-2.13.0}" 2>/dev/null; then
  from="already in .venv"  # pip would say "already satisfied" whatever the index: nothing to choose
elif [ "${index:--}" = - ]; then
  step "installing $torch_req from pip's default index (${why:-})"
  pip_install "$torch_req"
elif [ -n "${INFERQ_TORCH_INDEX:-}" ]; then
  step "installing $torch_req from $index ($why)"
  pip_install --index-url "$index" "$torch_req"
  from="from $(host "$index")"
else
  step "installing $torch_req from $index ($why)"
  # A short timeout and no retries: an index that stops answering costs seconds, not minutes, and
  # the default index still gives a working (if larger) torch.
  if quiet_fail=1 pip_install --timeout 5 --retries 0 --index-url "$index" "$torch_req"; then
    from="from $(host "$index")"
  else
    step "$index failed; installing $torch_req from pip's default index"
    pip_install "$torch_req"
  fi
fi
# -W ignore: torch warns that NumPy is missing, which it is until the next step.
.venv/bin/python -W ignore -c '
import sys, torch
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
print(f"  torch {torch.__version__} ({build}, {sys.argv[1]})")' "$from" >&2
step "installing inferq${EXTRAS:+[$EXTRAS]} and its dependencies"
pip_install -e ".${EXTRAS:+[$EXTRAS]}"
.venv/bin/python -c "import api, worker, shared, inferq.cli" >/dev/null
echo "$want" > "$stamp"
