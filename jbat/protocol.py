"""The evaluation protocol: a test split that nothing reads before the final evaluation.

Every task (labelled corpus or the user's files) has three target splits: adaptation (trains),
validation (chooses the best step, and every default), test (reported). `Sealed` holds the
encoded test examples: reading them (iterating, indexing) raises `TestSplitRead` unless inside
`Sealed.open()`, which only `experiment.test_nlls` calls, once per arm, seed and adapter state
set, after the adapter's training has ended. `reads` counts those openings (results.json).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


class TestSplitRead(RuntimeError):
  """The test split was read outside `Sealed.open()` (a bug: selection, early stopping or
  best-step choice must not see it)."""


class Sealed(Sequence):
  """A sequence of test examples that raises `TestSplitRead` on every read of its items outside
  `open()`. len() is allowed (a count chooses nothing)."""

  __test__ = False  # Not a pytest class.

  def __init__(self, items: Sequence[Any]):
    self._items = list(items)
    self._open = 0
    self.reads = 0

  def __len__(self) -> int:
    return len(self._items)

  def _check(self) -> None:
    if not self._open:
      raise TestSplitRead("the test split was read before the final evaluation (only "
                          "Sealed.open() may read it)")

  def __getitem__(self, i):
    self._check()
    return self._items[i]

  def __iter__(self) -> Iterator[Any]:
    self._check()
    return iter(self._items)

  @contextlib.contextmanager
  def open(self) -> Iterator[list[Any]]:
    """The examples, readable inside the block; counts one read."""
    self.reads += 1
    self._open += 1
    try:
      yield self._items
    finally:
      self._open -= 1
