"""LoRA: exact identity at init, target matching, adapter-only updates, merge, counts, export."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jbat import lora
from jbat.errors import JbatError
from jbat.losses import lm_loss
from jbat.models.causal_lm import CausalLM, LMConfig

V, T, R = 61, 12, 4
GPT2 = LMConfig.gpt2_like(V, max_len=16, d_model=32, n_layers=2, n_heads=4)  # d_ff = 128
LLAMA = LMConfig.llama_like(V, max_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            d_ff=48, qkv_bias=True)
CFG = lora.LoRAConfig(rank=R, alpha=8.0)


@nnx.jit
def fwd(model, tokens):
  return model(tokens)


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (2, T)), jnp.int32)


def _batch(seed=0):
  tokens = _tokens(seed)
  return {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
          "weights": jnp.ones((2, T), jnp.float32).at[:, -1].set(0.0)}


def _randomize_b(model, seed=1):
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_modules(model):
    if isinstance(node, lora.LoRALinear):
      node.lora_b[...] = jnp.asarray(0.1 * rng.normal(size=node.lora_b.shape), jnp.float32)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_init_reproduces_base_bitwise(cfg):
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens()
  before = np.asarray(model(tokens))  # Eager: same ops, so bitwise equality is meaningful.
  lora.apply_lora(model, CFG, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(model(tokens)), before)


def test_matched_paths():
  gpt2 = CausalLM(GPT2, rngs=nnx.Rngs(0))
  got = lora.apply_lora(gpt2, CFG, rngs=nnx.Rngs(1))
  mods = ("attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj", "mlp.fc1", "mlp.fc2")
  want = [f"layers.{i}.{m}" for i in range(2) for m in mods]
  assert got == sorted(want)
  assert isinstance(gpt2.layers[1].mlp.fc2, lora.LoRALinear)
  assert type(gpt2.layers[1].mlp.fc2.base) is nnx.Linear
  llama = CausalLM(LLAMA, rngs=nnx.Rngs(0))
  got = lora.apply_lora(llama, dataclasses.replace(CFG, targets=r".*attn\.(q_proj|v_proj)"),
                        rngs=nnx.Rngs(1))
  assert got == ["layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.attn.q_proj",
                 "layers.1.attn.v_proj"]
  assert type(llama.lm_head) is nnx.Linear and type(llama.layers[0].attn.k_proj) is nnx.Linear
  # Default targets: lm_head stays frozen, swiglu projections are adapted.
  llama2 = CausalLM(LLAMA, rngs=nnx.Rngs(0))
  assert "layers.0.mlp.gate_proj" in lora.apply_lora(llama2, CFG, rngs=nnx.Rngs(1))
  assert type(llama2.lm_head) is nnx.Linear


@pytest.mark.parametrize("kwargs,field", [
    (dict(rank=0), "lora.rank"), (dict(rank=-2), "lora.rank"),
    (dict(targets="("), "lora.targets"), (dict(targets="nothing_here"), "lora.targets"),
])
def test_bad_config_raises(kwargs, field):
  model = CausalLM(GPT2, rngs=nnx.Rngs(0))
  with pytest.raises(JbatError, match=field):
    lora.apply_lora(model, dataclasses.replace(CFG, **kwargs), rngs=nnx.Rngs(1))


def test_optimizer_step_changes_only_adapter():
  model = CausalLM(LLAMA, rngs=nnx.Rngs(0))
  lora.apply_lora(model, CFG, rngs=nnx.Rngs(1))
  _, adapter0, rest0 = jax.tree.map(np.asarray, lora.split(model))
  opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
    opt.update(model, grads)
    return loss

  batch = _batch()
  losses = [float(step(model, opt, batch)) for _ in range(3)]
  assert losses[-1] < losses[0]
  _, adapter1, rest1 = lora.split(model)
  jax.tree.map(np.testing.assert_array_equal, rest0, jax.tree.map(np.asarray, rest1))
  for path, old in lora.adapter_to_flat(adapter0).items():
    new = lora.adapter_to_flat(adapter1)[path]
    assert not np.array_equal(old, new), path


def test_functional_grad_over_adapter_state():
  model = CausalLM(GPT2, rngs=nnx.Rngs(0))
  lora.apply_lora(model, CFG, rngs=nnx.Rngs(1))
  graphdef, adapter, rest = lora.split(model)
  batch = _batch()

  @jax.jit
  def loss_fn(adapter, rest):
    return lm_loss(lora.merge(graphdef, adapter, rest), batch)

  grads = jax.grad(loss_fn)(adapter, rest)
  flat = lora.adapter_to_flat(grads)
  assert set(flat) == set(lora.adapter_to_flat(adapter))
  assert all(k.endswith(("lora_a", "lora_b")) for k in flat)
  # B = 0 at init: dL/dA = 0 exactly, dL/dB != 0.
  assert all(not v.any() for k, v in flat.items() if k.endswith("lora_a"))
  assert all(v.any() for k, v in flat.items() if k.endswith("lora_b"))
  np.testing.assert_allclose(float(loss_fn(adapter, rest)), float(lm_loss(model, batch)), rtol=1e-6)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_merge_into_base_matches(cfg):
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  lora.apply_lora(model, CFG, rngs=nnx.Rngs(1))
  _randomize_b(model)
  tokens = _tokens()
  want = np.asarray(fwd(model, tokens))
  merged = lora.merge_into_base(model)
  assert lora.count_params(merged)["adapter"] == 0
  assert not any(isinstance(n, lora.LoRALinear) for _, n in nnx.iter_modules(merged))
  assert isinstance(model.layers[0].attn.q_proj, lora.LoRALinear)  # input untouched
  base_model = CausalLM(cfg, rngs=nnx.Rngs(0))
  assert np.abs(want - np.asarray(fwd(base_model, tokens))).max() > 1e-3  # B != 0 matters
  np.testing.assert_allclose(np.asarray(fwd(merged, tokens)), want, atol=1e-5)


def test_count_params():
  model = CausalLM(GPT2, rngs=nnx.Rngs(0))
  n_base = lora.count_params(model)
  assert n_base["adapter"] == 0 and n_base["total"] == n_base["base"]
  lora.apply_lora(model, CFG, rngs=nnx.Rngs(1))
  d, f = GPT2.d_model, GPT2.d_ff
  per_layer = 4 * R * (d + d) + R * (d + f) + R * (f + d)
  counts = lora.count_params(model)
  assert counts["adapter"] == GPT2.n_layers * per_layer
  assert counts["base"] == n_base["total"]
  assert counts["total"] == counts["adapter"] + counts["base"]


def test_split_merge_and_flat_roundtrip():
  model = CausalLM(LLAMA, rngs=nnx.Rngs(0))
  lora.apply_lora(model, CFG, rngs=nnx.Rngs(1))
  _randomize_b(model)
  tokens = _tokens()
  graphdef, adapter, rest = lora.split(model)
  flat = lora.adapter_to_flat(adapter)
  assert flat["layers.1.mlp.down_proj.lora_b"].shape == (R, LLAMA.d_model)
  assert flat["layers.0.attn.k_proj.lora_a"].shape == (LLAMA.d_model, R)
  assert len(flat) == 2 * 2 * 7
  # A fresh adapter (B = 0) restored from `flat` gives back the trained model's logits.
  fresh = CausalLM(LLAMA, rngs=nnx.Rngs(0))
  lora.apply_lora(fresh, CFG, rngs=nnx.Rngs(9))
  g2, adapter2, rest2 = lora.split(fresh)
  restored = lora.merge(g2, lora.adapter_from_flat(flat, adapter2), rest2)
  np.testing.assert_array_equal(np.asarray(fwd(restored, tokens)), np.asarray(fwd(model, tokens)))
  np.testing.assert_array_equal(np.asarray(fwd(lora.merge(graphdef, adapter, rest), tokens)),
                                np.asarray(fwd(model, tokens)))
  with pytest.raises(JbatError, match="missing"):
    lora.adapter_from_flat({k: v for k, v in flat.items() if "layers.1" not in k}, adapter2)
  bad = dict(flat, **{"layers.0.attn.q_proj.lora_a": np.zeros((LLAMA.d_model, R + 1))})
  with pytest.raises(JbatError, match="shape"):
    lora.adapter_from_flat(bad, adapter2)


def test_bf16_lora_runs_close_to_f32():
  model = CausalLM(GPT2, rngs=nnx.Rngs(0))
  lora.apply_lora(model, CFG, rngs=nnx.Rngs(1))
  _randomize_b(model)
  bf = CausalLM(dataclasses.replace(GPT2, dtype="bfloat16"), rngs=nnx.Rngs(0))
  lora.apply_lora(bf, CFG, rngs=nnx.Rngs(1))
  nnx.update(bf, nnx.state(model))
  tokens = _tokens()
  np.testing.assert_allclose(np.asarray(fwd(bf, tokens)), np.asarray(fwd(model, tokens)),
                             atol=3e-2)
