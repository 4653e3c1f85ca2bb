"""io.release_host_memory hands glibc's freed heap back to the OS (a SmolLM2 run held ~1 GB of
freed heap before it)."""

import platform
import subprocess
import sys

import pytest

CHILD = r"""
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
io.release_host_memory()
print(freed, rss_mb())
"""


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                    reason="malloc_trim is glibc's")
def test_freed_heap_goes_back_to_the_os():
  out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                       check=True).stdout.split()
  freed, released = map(float, out)
  # 512 MB were freed into the heap; without the call they stay resident.
  assert freed - released > 300, (freed, released)

