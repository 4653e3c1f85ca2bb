"""CausalLM: numpy brute force, causal masking, packing, GQA, rope, bf16, config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM, LMConfig, apply_rope

V, T = 61, 12
GPT2 = LMConfig.gpt2_like(V, max_len=16, d_model=32, n_layers=2, n_heads=4)
LLAMA = LMConfig.llama_like(V, max_len=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            d_ff=48, qkv_bias=True)
CONFIGS = pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])


@nnx.jit
def fwd(model, tokens, positions=None, segment_ids=None):
  """Jitted forward: one compilation per (config, shape) instead of per eager op."""
  return model(tokens, positions, segment_ids)


def _tokens(seed=0, b=2, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def _flat_params(model):
  return {".".join(map(str, p)): np.asarray(v[...], np.float64)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _np_forward(cfg: LMConfig, p: dict, tokens: np.ndarray) -> np.ndarray:
  """Independent float64 numpy forward pass (one row at a time, loops over heads)."""
  def norm(x, pre):
    if cfg.norm == "rmsnorm":
      return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * p[pre + ".scale"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.norm_eps) * p[pre + ".scale"] + p.get(pre + ".bias", 0)

  def lin(x, pre):
    return x @ p[pre + ".kernel"] + p.get(pre + ".bias", 0)

  def rope(x, pos):  # x [T, Dh]: rotate pairs (i, i + Dh/2) as complex numbers.
    h = x.shape[-1] // 2
    w = cfg.rope_theta ** (-np.arange(h) * 2.0 / x.shape[-1])
    z = (x[:, :h] + 1j * x[:, h:]) * np.exp(1j * pos[:, None] * w)
    return np.concatenate([z.real, z.imag], -1)

  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  out = []
  for row in tokens:
    t, pos = len(row), np.arange(len(row))
    x = p["embed.embedding"][row]
    if cfg.pos == "learned":
      x = x + p["pos_embed.embedding"][pos]
    for i in range(cfg.n_layers):
      pre = f"layers.{i}."
      h = norm(x, pre + "attn_norm")
      q, k, v = (lin(h, pre + "attn." + n) for n in ("q_proj", "k_proj", "v_proj"))
      heads = []
      for hd in range(cfg.n_heads):
        kv = hd // (cfg.n_heads // cfg.kv_heads)
        qh, kh = q[:, hd * cfg.dh:(hd + 1) * cfg.dh], k[:, kv * cfg.dh:(kv + 1) * cfg.dh]
        vh = v[:, kv * cfg.dh:(kv + 1) * cfg.dh]
        if cfg.pos == "rope":
          qh, kh = rope(qh, pos), rope(kh, pos)
        s = qh @ kh.T / np.sqrt(cfg.dh) + np.triu(np.full((t, t), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        heads.append((s / s.sum(-1, keepdims=True)) @ vh)
      x = x + lin(np.concatenate(heads, -1), pre + "attn.o_proj")
      h = norm(x, pre + "mlp_norm")
      if cfg.mlp == "gelu":
        x = x + lin(gelu(lin(h, pre + "mlp.fc1")), pre + "mlp.fc2")
      else:
        g = lin(h, pre + "mlp.gate_proj")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, pre + "mlp.up_proj"), pre + "mlp.down_proj")
    x = norm(x, "final_norm")
    out.append(x @ p["embed.embedding"].T if cfg.tie_embeddings else lin(x, "lm_head"))
  return np.stack(out)


def _randomize(model, seed=1):
  """Non-trivial params (biases, norm scales) so the brute-force check sees every term."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  noisy = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.normal(size=x.shape), state)
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), noisy))
  return model


@CONFIGS
def test_matches_numpy_brute_force(cfg):
  model = _randomize(CausalLM(cfg, rngs=nnx.Rngs(0)))
  tokens = _tokens()
  got = fwd(model, tokens)
  assert got.dtype == jnp.float32 and got.shape == (2, T, V)
  want = _np_forward(cfg, _flat_params(model), np.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)


def test_submodule_names():
  llama = CausalLM(LLAMA, rngs=nnx.Rngs(0))
  names = set(_flat_params(llama))
  assert {"embed.embedding", "lm_head.kernel", "final_norm.scale", "layers.1.attn.q_proj.bias",
          "layers.0.mlp.gate_proj.kernel", "layers.0.attn_norm.scale"} <= names
  assert "pos_embed.embedding" not in names and "layers.0.attn.o_proj.bias" not in names
  gpt2 = set(_flat_params(CausalLM(GPT2, rngs=nnx.Rngs(0))))
  assert {"pos_embed.embedding", "layers.1.mlp.fc2.bias", "layers.0.mlp_norm.bias"} <= gpt2
  assert "lm_head.kernel" not in gpt2
  assert jnp.all(llama.layers[0].attn.q_proj.bias[...] == 0)
  assert abs(float(jnp.std(llama.embed.embedding[...])) - 0.02) < 0.003


@CONFIGS
def test_causal_mask(cfg):
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens()
  base = np.asarray(fwd(model, tokens))
  for t in (0, 4, T - 2):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % V)
    out = np.asarray(fwd(model, changed))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6)
    assert np.abs(out[:, t + 1] - base[:, t + 1]).max() > 1e-4


@CONFIGS
def test_packed_segments_equal_separate_runs(cfg):
  """All calls use shape [1, T] so the test compiles two programs (with/without segments)."""
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  row, filler = _tokens(3, b=1), _tokens(4, b=1)
  n1, n2 = 5, T - 5
  seg = jnp.asarray([[1] * n1 + [2] * n2], jnp.int32)
  pos = jnp.asarray([list(range(n1)) + list(range(n2))], jnp.int32)
  packed = np.asarray(fwd(model, row, pos, seg))
  alone1 = np.asarray(fwd(model, jnp.concatenate([row[:, :n1], filler[:, n1:]], 1)))
  alone2 = np.asarray(fwd(model, jnp.concatenate([row[:, n1:], filler[:, n2:]], 1)))
  np.testing.assert_allclose(packed[:, :n1], alone1[:, :n1], atol=1e-5)
  np.testing.assert_allclose(packed[:, n1:], alone2[:, :n2], atol=1e-5)
  # Left padding (segment 0) is invisible to the real tokens, and padding rows stay finite.
  n_pad = 4
  padded_row = jnp.concatenate([filler[:, :n_pad], row[:, :T - n_pad]], 1)
  seg = jnp.asarray([[0] * n_pad + [1] * (T - n_pad)], jnp.int32)
  pos = jnp.asarray([[0] * n_pad + list(range(T - n_pad))], jnp.int32)
  padded = np.asarray(fwd(model, padded_row, pos, seg))
  assert np.isfinite(padded).all()
  np.testing.assert_allclose(padded[:, n_pad:], np.asarray(fwd(model, row))[:, :T - n_pad],
                             atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
  gqa = _randomize(CausalLM(LLAMA, rngs=nnx.Rngs(0)))
  mha_cfg = dataclasses.replace(LLAMA, n_kv_heads=None)
  mha = CausalLM(mha_cfg, rngs=nnx.Rngs(5))
  rep, dh = LLAMA.n_heads // LLAMA.kv_heads, LLAMA.dh
  for g, m in zip(gqa.layers, mha.layers):
    for name in ("q_proj", "o_proj"):
      nnx.update(getattr(m.attn, name), nnx.state(getattr(g.attn, name)))
    for name in ("k_proj", "v_proj"):
      src, dst = getattr(g.attn, name), getattr(m.attn, name)
      kern = src.kernel[...].reshape(LLAMA.d_model, LLAMA.kv_heads, dh)
      dst.kernel[...] = jnp.repeat(kern, rep, axis=1).reshape(LLAMA.d_model, -1)
      dst.bias[...] = jnp.repeat(src.bias[...].reshape(LLAMA.kv_heads, dh), rep, 0).reshape(-1)
    for name in ("attn_norm", "mlp_norm", "mlp"):
      nnx.update(getattr(m, name), nnx.state(getattr(g, name)))
  for name in ("embed", "final_norm", "lm_head"):
    nnx.update(getattr(mha, name), nnx.state(getattr(gqa, name)))
  tokens = _tokens(7)
  np.testing.assert_allclose(np.asarray(fwd(mha, tokens)), np.asarray(fwd(gqa, tokens)), atol=1e-5)


def test_rope_preserves_norm_and_is_relative():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  at = lambda x, p: apply_rope(x, jnp.full((1, 1), p, jnp.int32), 10000.0)
  for p in (0, 3, 11):
    np.testing.assert_allclose(jnp.linalg.norm(at(q, p)), jnp.linalg.norm(q), rtol=1e-5)
  np.testing.assert_array_equal(at(q, 0), q)
  dot = lambda m, n: float(jnp.sum(at(q, m) * at(k, n)))
  for m, n in ((3, 1), (7, 5), (12, 10)):
    assert dot(m, n) == pytest.approx(dot(2, 0), abs=1e-4)
  assert abs(dot(3, 1) - dot(3, 3)) > 1e-3


@CONFIGS
def test_bf16_close_to_f32(cfg):
  f32 = CausalLM(cfg, rngs=nnx.Rngs(0))
  bf16 = CausalLM(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(1))
  nnx.update(bf16, nnx.state(f32))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
  tokens = _tokens()
  got = fwd(bf16, tokens)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(fwd(f32, tokens)), atol=3e-2)


@pytest.mark.parametrize("changes,field", [
    (dict(n_kv_heads=3), "model.n_kv_heads"),
    (dict(d_model=30), "model.d_model"),
    (dict(pos="alibi"), "model.pos"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(mlp="relu"), "model.mlp"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(n_layers=0), "model.n_layers"),
    (dict(pos="rope", head_dim=7), "model.head_dim"),
])
def test_validate_names_field(changes, field):
  with pytest.raises(JbatError, match=field):
    CausalLM(dataclasses.replace(LLAMA, **changes), rngs=nnx.Rngs(0))
