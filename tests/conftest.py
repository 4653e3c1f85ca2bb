"""Shared pytest setup for jbat's tests."""

import os
import pathlib

# Tests compile the same tiny models many times, in this process and in the CLI subprocesses
# they start: a persistent XLA compilation cache (inherited through the environment) makes the
# repeats cheap. It lives under .pytest_cache, which git ignores.
_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "network: needs a package registry (apt-get); skipped when unreachable"
  )
