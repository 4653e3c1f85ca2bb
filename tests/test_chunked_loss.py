"""`jbat.losses` with `vocab_chunk`: the chunked-vocabulary NLL equals the full-logits one (values
and adapter gradients) and its program, backward pass included, holds no [B, T, V] array."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jbat import config as config_lib
from jbat import losses, lora
from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.training import loop

B, T, V = 2, 11, 97  # V prime, unlike every other dimension


def _model(kind: str):
  if kind == "gpt2_tied":
    model = CausalLM(LMConfig.gpt2_like(V, max_len=16, d_model=32, n_layers=1, n_heads=2),
                     rngs=nnx.Rngs(0))
    targets = r".*q_proj"
  else:
    model = CausalLM(LMConfig.llama_like(V, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2),
                     rngs=nnx.Rngs(0))
    targets = r".*v_proj"  # LoRA on an untied lm_head is refused by the chunked loss.
  lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=4.0, targets=targets), rngs=nnx.Rngs(1))
  key = jax.random.key(2)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, lora.LoRALinear):
      key, sub = jax.random.split(key)
      m.lora_b[...] = 0.5 * jax.random.normal(sub, m.lora_b[...].shape)
  return model


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  w = (rng.random((B, T)) < 0.8).astype(np.float32)
  return {"tokens": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
          "weights": jnp.asarray(w)}


def _losses(model, batch, chunk):
  graphdef, adapter, rest = lora.split(model)

  def both(a):
    m = lora.merge(graphdef, a, rest)
    return (losses.lm_per_example_loss(m, batch),
            losses.lm_per_example_loss(m, batch, vocab_chunk=chunk))

  def fn(a):
    (ref, got), vjp = jax.vjp(both, a)
    ones = jnp.ones_like(ref)
    return ref, got, vjp((ones, 0 * ones))[0], vjp((0 * ones, ones))[0]

  return jax.jit(fn)(adapter)


# chunk 7: an uneven last chunk (97 = 13 * 7 + 6); V + 3: one chunk wider than the vocabulary.
@pytest.mark.parametrize("kind,chunk", [("gpt2_tied", V + 3), ("llama_untied", 7)])
def test_chunked_equals_full_logits(kind, chunk):
  model, batch = _model(kind), _batch()
  ref, got, g_ref, g_got = _losses(model, batch, chunk)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  if kind == "llama_untied":
    np.testing.assert_allclose(float(nnx.jit(lambda m: losses.lm_loss(m, batch, vocab_chunk=16))(model)),
                               float(nnx.jit(lambda m: losses.lm_loss(m, batch))(model)),
                               rtol=1e-5)


def _shapes(jaxpr, out=None):
  """Every variable shape in `jaxpr` and its sub-jaxprs (scan / checkpoint / pjit bodies)."""
  out = set() if out is None else out
  for eqn in jaxpr.eqns:
    out.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _shapes(inner, out)
  return out


def test_no_batch_by_length_by_vocab_array():
  model, batch = _model("llama_untied"), _batch()
  graphdef, adapter, rest = lora.split(model)
  grad = lambda f: jax.grad(lambda a: f(lora.merge(graphdef, a, rest), batch))
  ref = _shapes(jax.make_jaxpr(grad(losses.lm_loss))(adapter).jaxpr)
  got = _shapes(jax.make_jaxpr(grad(lambda m, b: losses.lm_loss(m, b, vocab_chunk=16)))(adapter).jaxpr)
  assert (B, T, V) in ref  # the check can fail: the plain loss does build the logits
  assert (B, T, 16) in got and not any(s[-1:] in ((V,), (112,)) and len(s) >= 3 for s in got)


def test_model_vocab_chunk_is_the_default_of_every_lm_loss():
  """LMConfig.vocab_chunk set on the model (as a run's model.vocab_chunk does) makes the losses'
  default, the loop's evaluation and the training loss chunked; vocab_chunk=0 forces the plain
  path."""
  model, batch = _model("llama_untied"), _batch()
  plain = (losses.lm_per_example_loss(model, batch), losses.lm_loss(model, batch),
           loop.lm_eval_sums(model, batch)[0])
  model.cfg = dataclasses.replace(model.cfg, vocab_chunk=16)
  graphdef, adapter, rest = lora.split(model)
  got = _shapes(jax.make_jaxpr(jax.grad(lambda a: loop.lm_train_loss(
      lora.merge(graphdef, a, rest), batch, None)))(adapter).jaxpr)
  got |= _shapes(jax.make_jaxpr(lambda a: loop.lm_eval_sums(lora.merge(graphdef, a, rest),
                                                            batch))(adapter).jaxpr)
  assert (B, T, 16) in got and (B, T, V) not in got
  chunked = (losses.lm_per_example_loss(model, batch), losses.lm_loss(model, batch),
             loop.lm_eval_sums(model, batch)[0])
  for a, b in zip(chunked, plain):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
  forced = losses.lm_per_example_loss(model, batch, vocab_chunk=0)
  np.testing.assert_array_equal(np.asarray(forced), np.asarray(plain[0]))


def test_config_vocab_chunk_auto_off_and_validation():
  c = config_lib.base_config()
  assert config_lib.vocab_chunk(c, 49152) == config_lib.AUTO_VOCAB_CHUNK
  assert config_lib.vocab_chunk(c, 8000) is None  # small vocabularies keep the exact path
  c.model.vocab_chunk = -1
  assert config_lib.vocab_chunk(c, 49152) is None
  c.model.vocab_chunk = 512
  assert config_lib.vocab_chunk(c, 8000) == 512
  assert config_lib.grad_rows(config_lib.base_config(), 49152) == config_lib.AUTO_GRAD_ROWS
  assert config_lib.grad_rows(config_lib.base_config(), 8000) is None
  c.model.vocab_chunk = -2
  with pytest.raises(JbatError, match="model.vocab_chunk"):
    config_lib.validate(c)
  c.model.vocab_chunk, c.model.grad_rows = 0, -3
  with pytest.raises(JbatError, match="model.grad_rows"):
    config_lib.validate(c)


@pytest.mark.parametrize("chunk", [0, 16])
def test_grad_rows_groups_equal_the_whole_batch(chunk):
  """lm_loss over groups of 2 rows (5 rows: the last group padded) has the whole batch's value
  and adapter gradient, and its program runs the model on 2-row groups only."""
  model = _model("llama_untied")
  rng = np.random.default_rng(3)
  batch = {"tokens": jnp.asarray(rng.integers(0, V, (5, T)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, V, (5, T)), jnp.int32),
           "weights": jnp.asarray((rng.random((5, T)) < 0.8).astype(np.float32))}
  graphdef, adapter, rest = lora.split(model)
  f = lambda rows: jax.value_and_grad(lambda a: losses.lm_loss(
      lora.merge(graphdef, a, rest), batch, vocab_chunk=chunk, grad_rows=rows))
  (ref, g_ref), (got, g_got) = jax.jit(f(0))(adapter), jax.jit(f(2))(adapter)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  shapes = _shapes(jax.make_jaxpr(f(2))(adapter).jaxpr)
  assert (2, T, 32) in shapes and (5, T, 32) not in shapes  # hidden states of 2-row groups
  model.cfg = dataclasses.replace(model.cfg, grad_rows=2)  # the model's setting is the default
  np.testing.assert_allclose(float(losses.lm_loss(model, batch, vocab_chunk=chunk)), float(ref),
                             rtol=1e-6)
