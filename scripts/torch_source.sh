#!/usr/bin/env bash
# Where scripts/bootstrap.sh installs torch from; prints one line: `<index URL> <label>`, the URL `-` for
# pip's default index (PyPI).
#
# PyPI's torch for Linux is the CUDA build (2.7 GB of nvidia/ libraries): right with an NVIDIA GPU,
# dead weight without one. Without one, PyTorch's CPU wheel index is tried first (a few hundred MB),
# if it answers within seconds; otherwise the default index, so that an install never fails for it.
#   INFERQ_TORCH_INDEX      an index to install torch from, whatever the machine ("-": the default one)
#   INFERQ_TORCH_CPU_INDEX  the CPU wheel index to try (default https://download.pytorch.org/whl/cpu)
set -euo pipefail
PY=${PYTHON:-python3}

if [ -n "${INFERQ_TORCH_INDEX:-}" ]; then
  echo "$INFERQ_TORCH_INDEX INFERQ_TORCH_INDEX"
  exit 0
fi

has_nvidia_gpu() {
  # The driver's own list, or nvidia-smi naming a GPU (a driver without nvidia-smi, or the reverse).
  compgen -G "/proc/driver/nvidia/gpus/*" >/dev/null && return 0
  command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU ' && return 0
  return 1
}

if [ "$(uname -s)" != Linux ]; then
  echo "- default index (not Linux: its torch has no CUDA libraries to spare)"
elif has_nvidia_gpu; then
  echo "- default index (an NVIDIA GPU: the CUDA build)"
else
  cpu=${INFERQ_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
  # Python rather than curl, which a bare machine may lack; a 5 s bound, since a blocked host may
  # drop packets rather than refuse.
  probe='import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)'
  if "$PY" -c "$probe" "$cpu" >/dev/null 2>&1; then
    echo "$cpu no NVIDIA GPU: the CPU build"
  else
    echo "- default index (no NVIDIA GPU, and $cpu did not answer)"
  fi
fi
