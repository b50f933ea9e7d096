#!/usr/bin/env bash
# Deviceless AOT compile tests (marker `aot`) for TPU v5e / v4 and the H100 target.
# Usage: .ci/aot.sh [DIR]   with the project's venv python first on PATH (as in .ci/run).
# Installs the pinned libtpu + jax CUDA plugin into DIR (default: a fresh temp dir; NEVER the main
# environment) and runs tests/aot with the environment the recipe needs. Exits non-zero if the
# toolchains cannot be installed or any compile test fails (the tests never skip).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
DIR="${1:-$(mktemp -d)/aot_deps}"
.ci/aot_deps.sh "$DIR"
echo "aot toolchain install took $(( $(date +%s) - start )) s"
PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 \
  TPU_WORKER_HOSTNAMES=localhost JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \
  python -m pytest -q -m aot tests/aot -p no:xdist --durations=10
echo "aot total $(( $(date +%s) - start )) s"
