"""Test-session setup: CPU only, 8 virtual devices (sharding tests), deterministic and quiet."""

import os
import warnings

# Must happen before jax is imported anywhere: 8 virtual CPU devices for the sharding tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Property tests draw the same examples on every run (CI must not fail at random on a new draw);
# `pytest --hypothesis-profile explore` draws fresh ones to hunt for new counterexamples.
import hypothesis  # noqa: E402

hypothesis.settings.register_profile("deterministic", derandomize=True)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile("deterministic")
