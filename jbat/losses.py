"""Causal-LM losses as pure functions.

A batch is a dict: "tokens" int32 [B, T], "targets" int32 [B, T] (tokens shifted left by one),
"weights" float32 [B, T] (0 on padding and on tokens not to be trained on), and optionally
"positions" and "segment_ids" int32 [B, T] (packed sequences; see `CausalLM.__call__`).

  nll[b, t]   = -log softmax(logits[b, t])[targets[b, t]]
  l(z_b)      = sum_t w[b, t] nll[b, t] / sum_t w[b, t]        (mean token NLL of example b)
  L(batch)    = sum_{b,t} w nll / max(sum_{b,t} w, 1)           (mean over weighted tokens)

With `vocab_chunk` (an int) the model-level losses never hold the [B, T, V] logits: they take
the final hidden states h [B, T, D] and the unembedding W [V, D] (`CausalLM.hidden_states`,
`CausalLM.output_embedding`) and run an online log-sum-exp over vocabulary chunks of
`vocab_chunk` rows (`chunked_token_nll`): each chunk's logits h W_c^T are computed in the
model's dtype (bf16 or f32), and the running max, sum of exponentials and target logit are
accumulated in float32. Each chunk is rematerialised in the backward pass, so the memory of
the loss and of its gradient is O(B T vocab_chunk). vocab_chunk=None (the default) takes the
model's `cfg.vocab_chunk` (LMConfig; None there, or vocab_chunk=0 here, is the plain path, bit
for bit as before), so a run sets it once on the model and its training, evaluation and
scoring losses all follow.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jbat.errors import JbatError

Batch = Mapping[str, jax.Array]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits [B, T, V], targets int [B, T] -> float32 [B, T] negative log-likelihoods."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def chunked_token_nll(hidden: jax.Array, unembed: jax.Array, targets: jax.Array,
                      vocab_chunk: int) -> jax.Array:
  """hidden [B, T, D], unembed W [V, D], targets int [B, T] -> float32 [B, T] NLLs of the
  logits h W^T, without materialising them: a `lax.scan` over ceil(V / vocab_chunk) chunks of
  W (the last zero-padded; its padded columns are excluded) keeps the running max m, the sum
  s of exp(logit - m) and the target's logit in float32; nll = m + log(s) - logit[target].

  The chunk logits are computed in hidden's dtype (bf16 compute, f32 accumulation) and the
  scan body is `jax.checkpoint`ed, so neither the forward nor the backward pass holds more
  than one [B, T, vocab_chunk] block. The running max is a stop_gradient constant (the
  log-sum-exp does not depend on it), so gradients and jvps are those of the plain loss.
  """
  if not isinstance(vocab_chunk, int) or isinstance(vocab_chunk, bool) or vocab_chunk <= 0:
    raise JbatError(f"losses: vocab_chunk must be a positive int or None, got {vocab_chunk!r}")
  v, d = unembed.shape
  chunk = min(vocab_chunk, v)
  n = -(-v // chunk)
  w = jnp.pad(unembed, ((0, n * chunk - v), (0, 0))).reshape(n, chunk, d).astype(hidden.dtype)
  targets = targets.astype(jnp.int32)
  lead = hidden.shape[:-1]

  @jax.checkpoint
  def body(carry, xs):
    m, s, tgt = carry
    wc, start = xs
    logits = jnp.einsum("...d,vd->...v", hidden, wc).astype(jnp.float32)
    cols = start + jnp.arange(chunk, dtype=jnp.int32)
    logits = jnp.where(cols < v, logits, -jnp.inf)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
    tgt = tgt + jnp.sum(jnp.where(cols == targets[..., None], logits, 0.0), axis=-1)
    return (m_new, s, tgt), None

  init = (jnp.full(lead, -jnp.inf, jnp.float32), jnp.zeros(lead, jnp.float32),
          jnp.zeros(lead, jnp.float32))
  starts = jnp.arange(n, dtype=jnp.int32) * chunk
  (m, s, tgt), _ = jax.lax.scan(body, init, (w, starts))
  return m + jnp.log(s) - tgt


def _weighted_mean(nll: jax.Array, weights: jax.Array) -> jax.Array:
  """[B]: sum_t w nll / sum_t w, positions with w == 0 (padding) skipped even if nll is not
  finite there."""
  w = weights.astype(jnp.float32)
  return (jnp.sum(jnp.where(w != 0, w * nll, 0.0), axis=-1)
          / jnp.maximum(jnp.sum(w, axis=-1), 1e-9))


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


def resolve_vocab_chunk(model: Any, vocab_chunk: int | None) -> int | None:
  """The chunk the model-level losses use: `vocab_chunk` if given (0: none, full logits), else
  the model's cfg.vocab_chunk (None when the model has no such setting)."""
  if vocab_chunk is None:
    return getattr(getattr(model, "cfg", None), "vocab_chunk", None)
  return None if vocab_chunk == 0 else vocab_chunk


def _chunked_nll(model: Any, batch: Batch, vocab_chunk: int) -> jax.Array:
  hidden = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
  return chunked_token_nll(hidden, model.output_embedding(), batch["targets"], vocab_chunk)


def lm_token_nll(model: Any, batch: Batch, vocab_chunk: int | None = None) -> jax.Array:
  """float32 [B, T] token NLLs of `model` on `batch` (vocab_chunk as `lm_per_example_loss`)."""
  chunk = resolve_vocab_chunk(model, vocab_chunk)
  if chunk is None:
    return token_nll(_logits(model, batch), batch["targets"])
  return _chunked_nll(model, batch, chunk)


def lm_per_example_loss(model: Any, batch: Batch, vocab_chunk: int | None = None) -> jax.Array:
  """[B] per-example loss l(z; phi) of `model` (a CausalLM, possibly with LoRA) on `batch`.

  vocab_chunk: None -> the model's cfg.vocab_chunk; 0 -> from the full logits; a positive int
  -> vocabulary-chunked (module docstring).
  """
  chunk = resolve_vocab_chunk(model, vocab_chunk)
  if chunk is None:
    return per_example_loss(_logits(model, batch), batch["targets"], batch["weights"])
  return _weighted_mean(_chunked_nll(model, batch, chunk), batch["weights"])


def _weighted_nll_sum(model: Any, batch: Batch, chunk: int | None) -> jax.Array:
  """Scalar sum_{b,t} w nll (padding skipped on the chunked path)."""
  w = batch["weights"].astype(jnp.float32)
  if chunk is None:
    return jnp.sum(w * token_nll(_logits(model, batch), batch["targets"]))
  return jnp.sum(jnp.where(w != 0, w * _chunked_nll(model, batch, chunk), 0.0))


def _row_group_nll_sum(model: Any, batch: Batch, chunk: int | None, rows: int) -> jax.Array:
  """`_weighted_nll_sum` as a `lax.scan` over groups of `rows` rows (the last padded with
  zero-weight rows), each group `jax.checkpoint`ed: the backward pass recomputes one group's
  forward at a time, so activation memory is that of `rows` rows instead of the batch's."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  keys = [k for k in ("tokens", "targets", "weights", "positions", "segment_ids") if k in batch]
  b = batch["tokens"].shape[0]
  n = -(-b // rows)
  pad = lambda x: jnp.pad(x, ((0, n * rows - b),) + ((0, 0),) * (x.ndim - 1))
  groups = {k: pad(batch[k]).reshape(n, rows, *batch[k].shape[1:]) for k in keys}
  graphdef, state = nnx.split(model)

  @jax.checkpoint
  def body(total, group):
    return total + _weighted_nll_sum(nnx.merge(graphdef, state), group, chunk), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), groups)
  return total


def lm_loss(model: Any, batch: Batch, vocab_chunk: int | None = None,
            grad_rows: int | None = None) -> jax.Array:
  """Scalar training loss: token-weighted mean NLL of `model` on `batch` (vocab_chunk as
  `lm_per_example_loss`).

  grad_rows: None -> the model's cfg.grad_rows; 0 -> the whole batch at once; a positive int ->
  the batch in groups of that many rows, one group's activations alive at a time in the
  backward pass (`_row_group_nll_sum`; the same value up to the order of the float32 sum).
  """
  chunk = resolve_vocab_chunk(model, vocab_chunk)
  if grad_rows is None:
    grad_rows = getattr(getattr(model, "cfg", None), "grad_rows", None)
  b = batch["tokens"].shape[0]
  if grad_rows and grad_rows < b:
    total = _row_group_nll_sum(model, batch, chunk, int(grad_rows))
    return total / jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
  if chunk is None:
    return mean_token_loss(_logits(model, batch), batch["targets"], batch["weights"])
  w = batch["weights"].astype(jnp.float32)
  nll = _chunked_nll(model, batch, chunk)
  return jnp.sum(jnp.where(w != 0, w * nll, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)
