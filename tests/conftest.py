"""Shared test setup: 4 virtual CPU devices, strict JAX promotion flags, tiny model fixtures.

XLA_FLAGS must be set before jax is first imported (the device count is fixed at backend start), so
it happens at the top of this file, which pytest imports before any test module.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

from jaxrecover.runtime import compile_cache as compile_cache  # noqa: E402

# Persistent compilation cache, one folder per machine for every test process: pytest-xdist workers
# (JAX locks the folder around each read/write) and the CLI subprocesses tests start (they inherit
# the variable). Tests pass with it cold; JAXRECOVER_COMPILATION_CACHE=off runs without it.
os.environ.setdefault(compile_cache.ENV, str(compile_cache.default_dir("xla-tests")))
compile_cache.enable()

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxrecover.testing import random_transformer, tiny_config  # noqa: E402

# Implicit rank broadcasting and implicit dtype promotion both hide shape/dtype bugs in model code;
# tests run with both turned into errors (Equinox / nanodo practice).
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

ARCHS = ("llama", "gpt2", "gemma2", "gemma3")


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model(request):
    """A random tiny float32 model of each family."""
    return random_transformer(jax.random.key(0), tiny_config(request.param))


@pytest.fixture(scope="session")
def llama_model():
    return random_transformer(jax.random.key(1), tiny_config("llama"))


@pytest.fixture
def getkey():
    """Fresh PRNG keys on demand: ``k = getkey()``."""
    state = {"key": jax.random.key(1234)}

    def next_key():
        state["key"], sub = jax.random.split(state["key"])
        return sub

    return next_key
