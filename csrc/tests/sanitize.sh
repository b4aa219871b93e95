#!/usr/bin/env bash
# The CUDA backend's small GPU test cases under compute-sanitizer: out-of-bounds / misaligned accesses
# (memcheck), shared-memory races (racecheck), barrier misuse (synccheck), reads of uninitialised global
# memory (initcheck). Run from the repository root on a GPU machine after `make build`:
#     csrc/tests/sanitize.sh            # all four tools
#     csrc/tests/sanitize.sh racecheck  # one tool
set -euo pipefail
cd "$(dirname "$0")/../.."
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
# PYTHON, else the project's .venv when it sees a GPU, else python3 (the GPU machines' own interpreter)
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  PY=.venv/bin/python
else
  PY=python3
fi
# The caching allocator hides out-of-bounds accesses inside its blocks from memcheck.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
tools=("${@:-memcheck racecheck synccheck initcheck}")
for tool in ${tools[*]}; do
  echo "== compute-sanitizer --tool $tool"
  "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
    "$PY" -m pytest -q -p no:cacheprovider -k sanitizer \
    tests/gpu/test_cuda_window_attention.py tests/gpu/test_cuda_region_match.py tests/gpu/test_cuda_region_loss.py
done
