#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (a bare `torch>=` requirement would otherwise pull a
# multi-GB CUDA build), then install this package with its dev (tests, transformers, clients) and serve extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev,serve]"
# Build the C++ decode kernels now (about a minute, once per machine and kernel version) rather than
# in the middle of the first command; without a compiler everything still runs on torch's paths.
.venv/bin/python -m mixtral.kernels || echo "note: continuing without the CPU kernels" >&2
echo "setup done: $(.venv/bin/python -c 'import torch, mixtral; print("torch", torch.__version__)')"
