"""Deviceless AOT compile tests for TPU (v5e, v4) and H100 targets.

These run in their own pytest invocation (see .ci/run) with the toolchains from .ci/aot_deps.sh on
PYTHONPATH and JAX_PLATFORMS=cpu; they are deselected from the default suite (marker `aot`).
If the toolchains are missing the tests FAIL with a plain message: they never skip silently.
"""

import os

import pytest

H100_TARGET = os.environ.get(
    "ZIPR1_H100_TARGET",
    os.path.join(os.path.dirname(__file__), "targets", "h100_sxm.txtpb"))


def _topology(kind: str):
    from jax.experimental import topologies

    try:
        if kind == "h100":
            if not os.path.exists(H100_TARGET):
                pytest.fail(f"H100 target description not found at {H100_TARGET} (set ZIPR1_H100_TARGET)")
            with open(H100_TARGET) as f:
                return topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=f.read())
        return topologies.get_topology_desc(topology_name=kind, platform="tpu")
    except Exception as e:  # noqa: BLE001 - re-raised as a plain failure message
        pytest.fail(f"cannot create the deviceless {kind} topology: {type(e).__name__}: {e}. "
                    "Install the toolchains with .ci/aot_deps.sh DIR and run with PYTHONPATH=DIR "
                    "JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 TPU_WORKER_HOSTNAMES=localhost "
                    "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1")


@pytest.fixture(scope="session")
def v5e_topology():
    return _topology("v5e:2x2")


@pytest.fixture(scope="session")
def v4_topology():
    return _topology("v4:2x2x1")


@pytest.fixture(scope="session")
def h100_topology():
    return _topology("h100")
