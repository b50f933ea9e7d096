#!/usr/bin/env bash
# Build the separate virtualenv that benchmarks/easydel_vs_ours.py runs EasyDeL (the JAX peer) in.
#
#   bash benchmarks/setup_easydel_venv.sh [VENV_DIR]   (default: $ZIPR1_EASYDEL_VENV or ../easydel_venv)
#   export ZIPR1_EASYDEL_PYTHON=VENV_DIR/bin/python
#
# EasyDeL lives in its OWN venv: easydel 0.3.0 pins flax==0.12.3, transformers~=5.5.0, ray==2.54 and
# ejkernel==0.0.78, which pins jax~=0.9.0, all incompatible with the project's (jax 0.10.x, flax
# 0.12.8, transformers >= 5.23). Nothing here touches the project's venv: every command runs the
# new venv's own python. torch (EasyDeL converts HF torch checkpoints with it) must stay the CPU
# 2.13.0 wheel from local disk: it is pinned with its local version (a bare `torch==2.13.0` also
# matches the CUDA build on the index), every install is constrained to it, and a dry run is
# checked first so a plan with another torch or any CUDA package fails here, before anything is
# installed. We never ask for easydel's `torch`/`cuda` extras (they pin torch==2.8.0 / CUDA jax).
# Versions are pinned for reproducible timings; change them here and in BENCHMARKS.md together.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-${ZIPR1_EASYDEL_VENV:-$(dirname "$(dirname "$HERE")")/easydel_venv}}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0+cpu"
EASYDEL_VERSION="0.3.0"
JAX_VERSION="0.9.2"             # ejkernel 0.0.78 (pinned by easydel 0.3.0) needs jax~=0.9.0
TRANSFORMERS_VERSION="5.5.4"    # easydel 0.3.0 needs transformers~=5.5.0
PACKAGES=("easydel==${EASYDEL_VERSION}" "jax==${JAX_VERSION}" "jaxlib==${JAX_VERSION}"
          "torch==${TORCH_VERSION}" "transformers==${TRANSFORMERS_VERSION}" "safetensors" "numpy"
          "pillow")  # easydel imports PIL (its eSurge multimodal path) without declaring it

for d in "${VIRTUAL_ENV:-}" "$(cd "$HERE/.." && pwd)/.venv" /work/venv; do
  if [ -n "$d" ] && [ "$(realpath -m "$VENV")" = "$(realpath -m "$d")" ]; then
    echo "setup_easydel_venv: refusing to install into $d (a project venv); pick another directory" >&2; exit 1
  fi
done

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
  grep -v "^WARNING: Location" "$CONSTRAINTS.plan"; echo "setup_easydel_venv: the dry run failed (see above)" >&2
  exit 1; }
plan="$(grep -E '^Would install' "$CONSTRAINTS.plan" || true)"
if echo "$plan" | grep -qiE 'nvidia|cuda|triton|libtpu'; then
  echo "$plan"; echo "setup_easydel_venv: the plan pulls accelerator packages; refusing (CPU only)" >&2; exit 1
fi
if echo "$plan" | grep -qE 'torch-[0-9]' && ! echo "$plan" | grep -qF "torch-${TORCH_VERSION}"; then
  echo "$plan"; echo "setup_easydel_venv: the plan pulls a torch other than ${TORCH_VERSION}; refusing" >&2; exit 1
fi

# 2. Install under the same constraint.
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${PACKAGES[@]}"

# 3. Report what we got (and fail if torch is not the CPU build or jax sees an accelerator).
JAX_PLATFORMS=cpu "$VENV/bin/python" - <<'EOF'
import easydel, flax, jax, torch, transformers
assert torch.__version__.endswith("+cpu"), torch.__version__
print(f"easydel {easydel.__version__}, jax {jax.__version__}, flax {flax.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
EOF
echo "export ZIPR1_EASYDEL_PYTHON=$VENV/bin/python"
