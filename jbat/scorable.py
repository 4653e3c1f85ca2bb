"""A model whose per-example loss jbat can score: what stages 1-2 need to know of a modality.

The surrogate (`jbat.surrogate`) and the pool streams (`jbat.scoring.stream`) are written once
for every model; a `Scorable` gives them the three modality-specific pieces:

  loss(model, batch) -> f32[B]    the per-example loss l(z_i) of a (merged) model; row i
                                  depends only on row i (the kernels' contract). Any randomness
                                  is in the batch, drawn from the example's id, so a score is a
                                  function of the example alone.
  make_batch(examples, rows)      examples -> one fixed-shape host batch of `rows` rows: numpy
                                  arrays keyed by `batch_keys` (the model inputs), "id" int64[rows]
                                  (-1 on padding) and "valid" bool[rows] (False on the padding
                                  rows past len(examples)).
  hash_examples(h, examples)      feeds the examples' content to a hashlib object: the cache
                                  keys of surrogates and score chunks.

`settings` (JSON values) are the batch maker's own parameters (token length, pad id, noise
draws...); they enter the score fingerprints next to the batch size and seeds.

Implementations: `lm(max_len, pad_id)` (below: token rows, mean token NLL) and
`jbat.diffusion.evaluate.image_scorable` (the denoiser's loss at per-example seeded timesteps
and noise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jbat import losses
from jbat.data import pipeline
from jbat.training import loop

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Scorable:
  """The loss, batch maker and example hasher of one modality (module docstring)."""

  loss: Callable[[Any, dict[str, Any]], jax.Array]
  make_batch: Callable[[Sequence[dict[str, Any]], int], Batch]
  hash_examples: Callable[[Any, Sequence[dict[str, Any]]], None]
  batch_keys: tuple[str, ...]  # The model inputs of a batch (placed on the mesh).
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def lm(max_len: int, pad_id: int) -> Scorable:
  """The causal LM: encoded examples ({"id", "ids", ...}, pipeline.encode) padded to `max_len`
  tokens with `pad_id` (pipeline.pad_batch); loss = mean token NLL (losses.lm_per_example_loss)."""
  return Scorable(loss=losses.lm_per_example_loss,
                  make_batch=lambda part, rows: pipeline.pad_batch(part, rows, max_len, pad_id),
                  hash_examples=pipeline.hash_examples, batch_keys=tuple(loop.MODEL_KEYS),
                  settings={"max_len": max_len, "pad_id": pad_id})
