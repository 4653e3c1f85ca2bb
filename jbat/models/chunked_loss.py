"""Token NLL with the output head applied one vocabulary chunk at a time.

For a real vocabulary (49k-152k tokens) the logits B x T x V dominate the memory of a language
model's loss. Here they never exist: with h = `model.hidden(tokens)` [B, T, D] and the output
head's columns split into chunks of C, a `lax.scan` keeps per token a running max m, a running
sum s = sum exp(z - m) and the target's logit z_y:

  z_c = h W_c            [B, T, C]   (W: the tied embedding E^T, lm_head's kernel, or with LoRA on
                                      lm_head W + scale A B, column chunk c)
  m'  = max(m, max z_c);  s = s exp(m - m') + sum exp(z_c - m');  z_y += z_c[target in c]
  nll = m + log s - z_y

and the scan body is rematerialised (`jax.checkpoint`), so the backward pass also holds one
[B, T, C] chunk at a time. Values equal `jbat.losses.token_nll(model(tokens), targets)` up to
float32 rounding (the sum is taken in another order), not bit for bit: an opt-in path, the
existing losses are unchanged. Vocabulary columns past V in the last chunk are masked out.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jbat.errors import JbatError
from jbat.lora import DoRALinear, LoRALinear


def _head(model) -> tuple[jax.Array, Any]:
  """(kernel [D, V] in float32 params, lora (a [D, r], b [r, V], scale) or None)."""
  if model.cfg.tie_embeddings:
    return model.embed.embedding[...].T, None
  head = model.lm_head
  if isinstance(head, DoRALinear):
    raise JbatError("chunked loss: DoRA on lm_head is not supported (target other modules)")
  if isinstance(head, LoRALinear):
    return head.base.kernel[...], (head.lora_a[...], head.lora_b[...], head.scale)
  return head.kernel[...], None


def chunked_token_nll(model, hidden: jax.Array, targets: jax.Array,
                      chunk: int = 4096) -> jax.Array:
  """float32 [B, T] negative log-likelihoods of `targets` from final hidden states `hidden`
  [B, T, D] (`model.hidden(...)`), computing the logits `chunk` vocabulary columns at a time."""
  v = model.cfg.vocab_size
  if not isinstance(chunk, int) or chunk <= 0:
    raise JbatError(f"chunked loss: chunk must be a positive integer, got {chunk!r}")
  chunk = min(chunk, v)
  n = -(-v // chunk)
  dt = hidden.dtype
  kernel, lora = _head(model)
  pad = n * chunk - v
  kernel = jnp.pad(kernel, ((0, 0), (0, pad))).reshape(kernel.shape[0], n, chunk)
  kernel = jnp.moveaxis(kernel, 1, 0)  # [n, D, C]
  xa = None
  if lora is not None:
    a, b, scale = lora
    xa = (hidden @ a.astype(dt)) * jnp.asarray(scale, dt)  # [B, T, r]
    b = jnp.moveaxis(jnp.pad(b, ((0, 0), (0, pad))).reshape(b.shape[0], n, chunk), 1, 0)
  else:
    b = jnp.zeros((n, 0, chunk), jnp.float32)
    xa = jnp.zeros(hidden.shape[:-1] + (0,), dt)
  targets = targets.astype(jnp.int32)

  @jax.checkpoint
  def body(carry, inputs):
    m, s, zy = carry
    w, bc, c = inputs
    z = hidden @ w.astype(dt)
    if lora is not None:
      z = z + xa @ bc.astype(dt)
    z = z.astype(jnp.float32)
    cols = c * chunk + jnp.arange(chunk)
    z = jnp.where(cols < v, z, -jnp.inf)
    m_new = jnp.maximum(m, z.max(axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[..., None]).sum(axis=-1)
    hit = cols == targets[..., None]
    zy = zy + jnp.where(hit, z, 0.0).sum(axis=-1)
    return (m_new, s, zy), None

  shape = targets.shape
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape, jnp.float32))
  (m, s, zy), _ = jax.lax.scan(body, init, (kernel, b, jnp.arange(n)))
  return m + jnp.log(s) - zy


def lm_per_example_loss_chunked(model, batch: Mapping[str, jax.Array],
                                chunk: int = 4096) -> jax.Array:
  """`jbat.losses.lm_per_example_loss` (weighted mean token NLL per example, [B]) without the
  [B, T, V] logits."""
  h = model.hidden(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
  w = batch["weights"].astype(jnp.float32)
  nll = chunked_token_nll(model, h, batch["targets"], chunk)
  return jnp.sum(w * nll, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1e-9)


def lm_loss_chunked(model, batch: Mapping[str, jax.Array], chunk: int = 4096) -> jax.Array:
  """`jbat.losses.lm_loss` (token-weighted mean NLL, scalar) without the [B, T, V] logits."""
  h = model.hidden(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
  w = batch["weights"].astype(jnp.float32)
  nll = chunked_token_nll(model, h, batch["targets"], chunk)
  return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1.0)
