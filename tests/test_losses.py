"""Losses against numpy brute force; padding invariance; model-level losses."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jbat import losses
from jbat.models.causal_lm import CausalLM, LMConfig

B, T, V = 3, 7, 11


def _data(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  weights = (rng.random((B, T)) < 0.7).astype(np.float32)
  weights[2] = 0.0  # an example with no trained token
  return logits, targets, weights


def _np_nll(logits, targets):
  x = logits.astype(np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  return lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]


def test_token_nll_brute_force():
  logits, targets, _ = _data()
  got = losses.token_nll(jnp.asarray(logits), jnp.asarray(targets))
  assert got.dtype == jnp.float32 and got.shape == (B, T)
  np.testing.assert_allclose(np.asarray(got), _np_nll(logits, targets), rtol=1e-5, atol=1e-5)
  # bf16 logits are upcast before the log-softmax.
  got16 = losses.token_nll(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
  assert got16.dtype == jnp.float32


def test_per_example_and_mean_losses_brute_force():
  logits, targets, weights = _data()
  nll = _np_nll(logits, targets)
  want_ex = [(weights[b] * nll[b]).sum() / weights[b].sum() if weights[b].sum() else 0.0
             for b in range(B)]
  got_ex = losses.per_example_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  assert got_ex.shape == (B,)
  np.testing.assert_allclose(np.asarray(got_ex), want_ex, rtol=1e-5)
  assert float(got_ex[2]) == 0.0
  got = losses.mean_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(float(got), (weights * nll).sum() / weights.sum(), rtol=1e-5)
  zero = losses.mean_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((B, T)))
  assert float(zero) == 0.0


def test_fractional_weights():
  logits, targets, _ = _data(1)
  weights = np.random.default_rng(2).random((B, T)).astype(np.float32)
  nll = _np_nll(logits, targets)
  got = losses.per_example_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(np.asarray(got), (weights * nll).sum(1) / weights.sum(1), rtol=1e-5)


def test_padding_positions_do_not_matter():
  logits, targets, weights = _data()
  pad = weights == 0
  rng = np.random.default_rng(5)
  logits2 = np.where(pad[..., None], rng.normal(size=logits.shape) * 10, logits).astype(np.float32)
  targets2 = np.where(pad, rng.integers(0, V, targets.shape), targets).astype(np.int32)
  args = lambda lg, tg: (jnp.asarray(lg), jnp.asarray(tg), jnp.asarray(weights))
  np.testing.assert_array_equal(np.asarray(losses.per_example_loss(*args(logits, targets))),
                                np.asarray(losses.per_example_loss(*args(logits2, targets2))))
  np.testing.assert_allclose(float(losses.mean_token_loss(*args(logits, targets))),
                             float(losses.mean_token_loss(*args(logits2, targets2))), rtol=1e-6)


def test_model_losses_use_positions_and_segments():
  cfg = LMConfig.llama_like(V, max_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, V, (2, 8)), jnp.int32)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1),
           "weights": jnp.ones((2, 8)).at[:, -1].set(0.0),
           "positions": jnp.asarray([list(range(4)) * 2] * 2, jnp.int32),
           "segment_ids": jnp.asarray([[1] * 4 + [2] * 4] * 2, jnp.int32)}
  plain = {k: batch[k] for k in ("tokens", "targets", "weights")}

  @nnx.jit  # One compilation for everything below.
  def run(model):
    logits = model(tokens, batch["positions"], batch["segment_ids"])
    return dict(
        per_ex=losses.lm_per_example_loss(model, batch),
        want_ex=losses.per_example_loss(logits, batch["targets"], batch["weights"]),
        loss=losses.lm_loss(model, batch),
        want=losses.mean_token_loss(logits, batch["targets"], batch["weights"]),
        plain=losses.lm_loss(model, plain),
        grads=nnx.grad(losses.lm_loss)(model, batch))

  out = run(model)
  np.testing.assert_allclose(np.asarray(out["per_ex"]), np.asarray(out["want_ex"]), rtol=1e-6)
  np.testing.assert_allclose(float(out["loss"]), float(out["want"]), rtol=1e-6)
  # Without positions/segment_ids the model sees one long sequence: a different loss.
  assert abs(float(out["plain"]) - float(out["loss"])) > 1e-6
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(out["grads"]))
