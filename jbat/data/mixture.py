"""BAT training batches: a fixed mixture of adaptation examples and selected backbone examples.

Every batch of B rows holds

  rows 0 .. n_a-1:  n_a = B - n_b          adaptation examples (source 0), then
  rows n_a .. B-1:  n_b = round(rho * B)   selected backbone examples (source 1),

each part read from its own endless, deterministic stream: the padded `pipeline.train_loader`
over that example list (shard -> shuffle -> repeat with a fresh permutation per epoch -> B_part
consecutive examples), seeded with `seed` for the adaptation stream and with a seed derived
from (seed, 1) for the backbone stream, so the two are independent. Rows are in
`pipeline.pad_batch` format plus `source` int8[B] (0 = adaptation, 1 = backbone); the loss
weights of backbone rows are multiplied by `lam`.

With the token-weighted training loss `sum(w * nll) / sum(w)` (jbat.losses.mean_token_loss)
the backbone rows' share of the total loss weight sum(w) is

  lam * T_b / (T_a + lam * T_b)        (T_a, T_b = target tokens in each part)

so lam = 1 weighs every token equally and lam = T_a / T_b would give both parts equal shares.

rho = 0 ignores the backbone list: the batches are exactly those of
`pipeline.train_loader(adapt_examples, B, ...)` with the same seed (plus `source` = 0).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jbat.data import pipeline
from jbat.data.pipeline import Batch, Example
from jbat.errors import JbatError

ADAPT, BACKBONE = 0, 1


def split_rows(batch_size: int, rho: float) -> tuple[int, int]:
  """(n_a, n_b): adaptation and backbone rows of a batch, n_b = round(rho * B), n_a = B - n_b.

  Raises:
    JbatError: rho outside [0, 1), or a batch too small for the split (rho > 0 but n_b = 0,
      or n_a = 0).
  """
  if batch_size < 1:
    raise JbatError(f"batch_size must be >= 1, got {batch_size}.")
  if not (isinstance(rho, numbers.Real) and 0.0 <= rho < 1.0):
    raise JbatError(f"rho (backbone fraction of each batch) must be in [0, 1), got {rho!r}.")
  n_b = int(round(rho * batch_size))
  n_a = batch_size - n_b
  if (rho > 0 and n_b == 0) or n_a == 0:
    raise JbatError(
        f"batch_size {batch_size} is too small for rho={rho}: round(rho * B) = {n_b} backbone "
        f"and {n_a} adaptation rows, both must be >= 1 (use a larger batch or another rho)."
    )
  return n_a, n_b


def backbone_seed(seed: int, phase: int = 0) -> int:
  """Seed of the backbone stream: a 32-bit hash of (seed, 1), independent of the adapt stream's;
  of (seed, 1, phase) for the stream of a re-selection phase > 0."""
  words = [int(seed), BACKBONE] + ([int(phase)] if phase else [])
  return int(np.random.SeedSequence(words).generate_state(1)[0])


def _with_source(batch: Batch, source: int) -> Batch:
  batch = dict(batch)
  batch["source"] = np.full((len(batch["valid"]),), source, np.int8)
  return batch


class MixtureIterator(grain.DatasetIterator):
  """Endless mixture batches from two padded train_loader streams (backbone stream optional).

  State: {"adapt": <adapt stream state>, "backbone": <backbone stream state> or None,
  "phase": p}, a JSON-serialisable dict; `set_state` on an iterator built with the same
  arguments continues with exactly the same batches. An iterator of a later phase (BAT
  re-selection: a new backbone list) takes only the adaptation stream's position from the
  state of an earlier phase; its backbone stream starts at its beginning.
  """

  def __init__(self, adapt: Any, backbone: Any | None, lam: float, phase: int = 0):
    super().__init__()
    self._adapt = adapt
    self._backbone = backbone
    self._lam = float(lam)
    self._phase = int(phase)

  def __next__(self) -> Batch:
    a = _with_source(next(self._adapt), ADAPT)
    if self._backbone is None:
      return a
    b = _with_source(next(self._backbone), BACKBONE)
    b["weights"] = b["weights"] * np.float32(self._lam)
    return {k: np.concatenate([a[k], b[k]], axis=0) for k in a}

  def get_state(self) -> dict[str, Any]:
    return {
        "adapt": self._adapt.get_state(),
        "backbone": None if self._backbone is None else self._backbone.get_state(),
        "phase": self._phase,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "adapt" not in state or "backbone" not in state:
      raise JbatError(
          f"not a mixture-loader state: {state!r} (expected keys 'adapt' and 'backbone')."
      )
    if (state["backbone"] is None) != (self._backbone is None):
      raise JbatError(
          "mixture-loader state does not match the loader: it was saved with"
          f"{'out' if state['backbone'] is None else ''} a backbone stream, this loader has"
          f"{'out' if self._backbone is None else ''} one (check rho)."
      )
    phase = int(state.get("phase", 0))
    if phase > self._phase:
      raise JbatError(f"mixture-loader state is of re-selection phase {phase}, this loader is "
                      f"of the earlier phase {self._phase}")
    self._adapt.set_state(state["adapt"])
    if self._backbone is not None and phase == self._phase:
      self._backbone.set_state(state["backbone"])


def mixture_loader(
    adapt_examples: Sequence[Example],
    backbone_examples: Sequence[Example] | None,
    batch_size: int,
    max_len: int,
    pad_id: int,
    seed: int,
    *,
    rho: float,
    lam: float = 1.0,
    shard_index: int = 0,
    shard_count: int = 1,
    phase: int = 0,
) -> MixtureIterator:
  """Endless BAT batches: B - round(rho B) adaptation rows, then round(rho B) backbone rows.

  Args:
    adapt_examples, backbone_examples: encoded examples ({"id", "ids"}, see pipeline.encode);
      the backbone list is ignored when rho = 0.
    batch_size: B, rows per batch on this process.
    rho: backbone fraction of each batch, in [0, 1).
    lam: multiplier (>= 0) of the loss weights of backbone rows.
    shard_index, shard_count: both streams are sharded like `pipeline.train_loader`.
    phase: the re-selection phase of `backbone_examples` (0: the initial selection); the
      backbone stream is seeded with backbone_seed(seed, phase), see MixtureIterator.
  Returns:
    a MixtureIterator of pad_batch dicts plus "source" int8[B] (0 adaptation, 1 backbone).

  Raises:
    JbatError: rho outside [0, 1), lam < 0 or not finite, rho > 0 with no backbone examples,
      a batch too small for the split, or anything `pipeline.train_loader` rejects.
  """
  n_a, n_b = split_rows(batch_size, rho)
  if not (isinstance(lam, numbers.Real) and math.isfinite(lam) and lam >= 0):
    raise JbatError(f"lam (weight of backbone rows) must be a finite number >= 0, got {lam!r}.")
  if n_b and not backbone_examples:
    raise JbatError(
        f"rho={rho} asks for {n_b} backbone rows per batch, but no backbone examples were "
        f"given (empty selection): select some, or set rho = 0."
    )
  shard = {"shard_index": shard_index, "shard_count": shard_count}
  adapt = pipeline.train_loader(adapt_examples, n_a, max_len, pad_id, seed, **shard)
  backbone = None
  if n_b:
    backbone = pipeline.train_loader(
        backbone_examples, n_b, max_len, pad_id, backbone_seed(seed, phase), **shard
    )
  return MixtureIterator(adapt, backbone, lam, phase)
