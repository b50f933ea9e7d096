#!/usr/bin/env bash
# Install the deviceless-compile toolchains for the `aot` tests into a SEPARATE directory
# (never into the main environment: libtpu / the CUDA plugin change which platforms JAX sees).
# Usage: .ci/aot_deps.sh DIR   (uses the python on PATH, i.e. the project's venv)
set -euo pipefail
DIR="$1"
JAX_VERSION=$(python -c 'import jax; print(jax.__version__)')
# libtpu pinned to what jax[tpu]==$JAX_VERSION requires (0.0.42.* for jax 0.10.2).
LIBTPU_SPEC=$(python - "$JAX_VERSION" <<'PY'
import sys
from importlib.metadata import requires
for r in requires("jax") or []:
    if r.startswith("libtpu") and 'extra == "tpu"' in r:
        print(r.split(";")[0].strip().replace(" ", ""))
        break
else:
    sys.exit("cannot find the libtpu pin in jax's metadata")
PY
)
mkdir -p "$DIR"
if ! pip install -q --no-deps --target "$DIR" "$LIBTPU_SPEC" \
      "jax-cuda13-plugin==$JAX_VERSION" "jax-cuda13-pjrt==$JAX_VERSION"; then
  echo "ERROR: could not install the AOT toolchains ($LIBTPU_SPEC, jax-cuda13-plugin/pjrt==$JAX_VERSION)."
  echo "ERROR: the deviceless TPU/H100 compile tests cannot run; failing instead of skipping."
  exit 1
fi
echo "AOT toolchains installed in $DIR: $LIBTPU_SPEC, jax-cuda13-plugin==$JAX_VERSION"
