"""Causal-LM losses as pure functions.

A batch is a dict: "tokens" int32 [B, T], "targets" int32 [B, T] (tokens shifted left by one),
"weights" float32 [B, T] (0 on padding and on tokens not to be trained on), and optionally
"positions" and "segment_ids" int32 [B, T] (packed sequences; see `CausalLM.__call__`).

  nll[b, t]   = -log softmax(logits[b, t])[targets[b, t]]
  l(z_b)      = sum_t w[b, t] nll[b, t] / sum_t w[b, t]        (mean token NLL of example b)
  L(batch)    = sum_{b,t} w nll / max(sum_{b,t} w, 1)           (mean over weighted tokens)
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Batch = Mapping[str, jax.Array]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits [B, T, V], targets int [B, T] -> float32 [B, T] negative log-likelihoods."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def per_example_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """[B]: weighted mean token NLL per example; exactly 0 for an example whose weights are all 0."""
  w = weights.astype(jnp.float32)
  return jnp.sum(w * token_nll(logits, targets), axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1e-9)


def mean_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Scalar: sum(w * nll) / max(sum(w), 1) over the whole batch (token-weighted mean)."""
  w = weights.astype(jnp.float32)
  return jnp.sum(w * token_nll(logits, targets)) / jnp.maximum(jnp.sum(w), 1.0)


def _logits(model: Any, batch: Batch) -> jax.Array:
  return model(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))


def lm_per_example_loss(model: Any, batch: Batch) -> jax.Array:
  """[B] per-example loss l(z; phi) of `model` (a CausalLM, possibly with LoRA) on `batch`."""
  return per_example_loss(_logits(model, batch), batch["targets"], batch["weights"])


def lm_loss(model: Any, batch: Batch) -> jax.Array:
  """Scalar training loss: token-weighted mean NLL of `model` on `batch`."""
  return mean_token_loss(_logits(model, batch), batch["targets"], batch["weights"])
