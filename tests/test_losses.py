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


def test_chunked_token_nll_equals_plain_with_gradient():
  rng = np.random.default_rng(3)
  d = 5
  hidden = jnp.asarray(rng.normal(size=(B, T, d)), jnp.float32)
  unembed = jnp.asarray(rng.normal(size=(V, d)) * 2, jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  cot = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  plain = lambda h, w: losses.token_nll(h @ w.T, targets)
  want = np.asarray(plain(hidden, unembed))
  want_g = jax.grad(lambda h, w: jnp.sum(cot * plain(h, w)), (0, 1))(hidden, unembed)
  for chunk in (1, 4, V, 64):  # 4 does not divide V = 11: the last chunk is padded.
    fn = lambda h, w, c=chunk: losses.chunked_token_nll(h, w, targets, c)
    got = fn(hidden, unembed)
    assert got.dtype == jnp.float32 and got.shape == (B, T)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    got_g = jax.grad(lambda h, w: jnp.sum(cot * fn(h, w)), (0, 1))(hidden, unembed)
    for g, w in zip(got_g, want_g):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_chunked_model_loss_matches_plain_and_default_is_unchanged():
  rng = np.random.default_rng(4)
  for cfg in (LMConfig.gpt2_like(V, max_len=8, d_model=16, n_layers=1, n_heads=2),  # tied
              LMConfig.llama_like(V, max_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)):
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    weights = jnp.asarray((rng.random((B, T)) < 0.7), jnp.float32).at[2].set(0.0)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": weights}
    graphdef, params = nnx.split(model)
    loss = lambda p, c: losses.lm_per_example_loss(nnx.merge(graphdef, p), batch, vocab_chunk=c)
    # The default (no chunking) is exactly the loss of the full logits, bit for bit.
    full = losses.per_example_loss(model(tokens), batch["targets"], weights)
    np.testing.assert_array_equal(np.asarray(loss(params, None)), np.asarray(full))
    got = loss(params, 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-5)
    assert float(got[2]) == 0.0
    total = lambda p, c: jnp.sum(loss(p, c) * jnp.arange(1.0, B + 1))
    for g, w in zip(jax.tree.leaves(jax.grad(total)(params, 4)),
                    jax.tree.leaves(jax.grad(total)(params, None))):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(losses.lm_loss(model, batch, vocab_chunk=3)),
                               float(losses.lm_loss(model, batch)), rtol=1e-5)


def test_chunked_loss_bf16_and_padding_skipped():
  cfg = LMConfig.llama_like(V, max_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                            dtype="bfloat16")
  model = CausalLM(cfg, rngs=nnx.Rngs(1))
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, V, (B, T)), jnp.int32)
  weights = jnp.ones((B, T)).at[:, 5:].set(0.0)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": weights}
  got = losses.lm_per_example_loss(model, batch, vocab_chunk=4)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(losses.lm_per_example_loss(model, batch)),
                             rtol=2e-2)
  # A non-finite NLL at a padded position (weight 0) does not reach the example's loss.
  bad = batch | {"targets": batch["targets"].at[0, 6].set(10 ** 6)}  # no such vocabulary row
  h = model.hidden_states(tokens).at[0, 6].set(jnp.inf)
  nll = losses.chunked_token_nll(h, model.output_embedding(), bad["targets"], 4)
  assert not np.isfinite(float(nll[0, 6]))
  np.testing.assert_array_equal(np.asarray(losses._weighted_mean(nll, weights))[0],
                                np.asarray(got)[0])
