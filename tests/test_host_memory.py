"""io.release_host_memory hands glibc's freed heap back to the OS (a SmolLM2 run held ~1 GB of
freed heap before it), and io.release_memory_after_compiles does so after each XLA compile."""

import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
    reason="malloc_trim is glibc's")

# Leaves 512 MB of freed heap in the child (`freed` = its RSS then), as a compile leaves it.
FREED_HEAP = r"""
import numpy as np
from jbat import io

def rss_mb():
  for line in open("/proc/self/status"):
    if line.startswith("VmRSS"):
      return int(line.split()[1]) / 1024

big = np.ones(16 << 20, np.uint8); del big   # Raises glibc's mmap threshold to 16 MB.
keep, chunks = [], []
for i in range(64):                          # 64 x 8 MB from the heap, a small block after each
  chunks.append(np.ones(8 << 20, np.uint8))  # so that free() cannot shrink the heap's top.
  keep.append(np.ones(1024, np.uint8))
del chunks
freed = rss_mb()
"""

CHILD = FREED_HEAP + r"""
io.release_host_memory()
print(freed, rss_mb())
"""

COMPILE_CHILD = FREED_HEAP + r"""
import jax, jax.numpy as jnp
jax_mb = rss_mb() - freed
io.release_memory_after_compiles(min_seconds=0.0)
io.release_memory_after_compiles(min_seconds=0.0)  # Idempotent: one listener.
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()  # A compile: trimmed after it.
print(freed, rss_mb(), len(io._TRIM_LISTENER), jax_mb)
"""


def run_child(code: str) -> list[float]:
  return [float(x) for x in subprocess.run([sys.executable, "-c", code], capture_output=True,
                                           text=True, check=True).stdout.split()]


@glibc_only
def test_freed_heap_goes_back_to_the_os():
  freed, released = run_child(CHILD)
  # 512 MB were freed into the heap; without the call they stay resident.
  assert freed - released > 300, (freed, released)


@glibc_only
def test_freed_heap_goes_back_after_a_compile():
  freed, after, listeners, jax_mb = run_child(COMPILE_CHILD)
  assert listeners == 1
  # Less than jax's import and the compile added: the 512 MB of freed heap went back.
  assert freed + jax_mb - after > 300, (freed, jax_mb, after)
