#!/usr/bin/env bash
# Build the separate virtualenv that benchmarks/grpo_step_vs_trl.py runs TRL's GRPOTrainer in.
#
#   bash benchmarks/setup_trl_env.sh [VENV_DIR]        (default: $ZIPR1_TRL_VENV or ../trl_venv)
#   export ZIPR1_TRL_PYTHON=VENV_DIR/bin/python
#
# TRL lives in its OWN venv so it never touches the project's environment (its dependency pins
# would move transformers/torch there). torch must stay the CPU 2.13.0 wheel: every install is
# constrained to it, and a dry run is checked first so a resolver that wants another torch or any
# CUDA package fails here, before anything is installed. Versions are pinned for reproducible
# timings; change them here and in BENCHMARKS.md together.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-${ZIPR1_TRL_VENV:-$(dirname "$(dirname "$HERE")")/trl_venv}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
TRL_VERSION="1.16.0"
TRANSFORMERS_VERSION="5.24.0"   # the same as the project's venv, so both sides run one model code
PACKAGES=("torch==${TORCH_VERSION}" "trl==${TRL_VERSION}" "transformers==${TRANSFORMERS_VERSION}"
          "accelerate" "datasets" "numpy" "safetensors"
          "pillow")  # the VLM step (--image): transformers' PIL image processor and the PNG images

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS" "$CONSTRAINTS.plan"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"

# 1. Dry run: refuse a plan that pulls another torch or CUDA wheels.
"${PIP[@]}" install --dry-run -c "$CONSTRAINTS" "${PACKAGES[@]}" > "$CONSTRAINTS.plan" 2>&1 || {
  cat "$CONSTRAINTS.plan"; echo "setup_trl_env: the dry run failed (see above)" >&2; exit 1; }
plan="$(grep -E '^Would install' "$CONSTRAINTS.plan" || true)"
if echo "$plan" | grep -qiE 'nvidia|cuda|triton'; then
  echo "$plan"; echo "setup_trl_env: the plan pulls CUDA packages; refusing (CPU torch only)" >&2; exit 1
fi
if echo "$plan" | grep -qE 'torch-[0-9]' && ! echo "$plan" | grep -qE "torch-${TORCH_VERSION}\+cpu"; then
  echo "$plan"; echo "setup_trl_env: the plan pulls a torch other than ${TORCH_VERSION}+cpu; refusing" >&2; exit 1
fi

# 2. Install under the same constraint.
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${PACKAGES[@]}"

# 3. Report what we got (and fail if torch is not the CPU build).
"$VENV/bin/python" - <<'EOF'
import torch, transformers, trl
assert torch.__version__.endswith("+cpu") or not torch.cuda.is_available(), torch.__version__
print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
EOF
echo "export ZIPR1_TRL_PYTHON=$VENV/bin/python"
