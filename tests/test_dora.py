"""DoRA (`LoRAConfig.dora`): identity at init, peft's `use_dora` on the exported adapter gives
jbat's logits after training steps, merging is exact, ALBAT scores match brute force."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import nnx

torch = pytest.importorskip("torch", reason="torch not installed")
peft = pytest.importorskip("peft", reason="peft not installed")
transformers = pytest.importorskip("transformers")

from jbat import lora, peft_io  # noqa: E402
from jbat.models import hf_io  # noqa: E402
from jbat.scoring import kernels as K  # noqa: E402
from tests.test_hf_io import gpt2_config, llama_config, random_ids, save_hf, torch_logits  # noqa

RTOL = 1e-4


def dora_model(path, targets=lora.DEFAULT_TARGETS, seed=0):
  model, _ = hf_io.load_causal_lm(path)
  lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=4.0, targets=targets, dora=True),
                  rngs=nnx.Rngs(seed))
  return model


def nll_per_example(model, tokens):
  """Mean next-token NLL of each row, f32[B]."""
  logp = jax.nn.log_softmax(model(tokens[:, :-1]))
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].mean(axis=1)


def train(model, tokens, steps=4, lr=0.05):
  """A few Adam steps on the adapter (A, B and the magnitudes) of `model`, in place."""
  graphdef, adapter, rest = lora.split(model)
  opt = optax.adam(lr)
  state = opt.init(adapter)

  @jax.jit
  def step(adapter, state):
    loss = lambda a: nll_per_example(lora.merge(graphdef, a, rest), tokens).mean()
    grads = jax.grad(loss)(adapter)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(adapter, updates), state

  for _ in range(steps):
    adapter, state = step(adapter, state)
  nnx.update(model, adapter)
  return model


def test_dora_is_the_backbone_at_init(tmp_path):
  save_hf(llama_config(), tmp_path / "base")
  base, _ = hf_io.load_causal_lm(tmp_path / "base")
  model = dora_model(tmp_path / "base")
  ids = jnp.asarray(random_ids(2))
  fwd = nnx.jit(lambda m, t: m(t))
  # Equal up to rounding: under jit, XLA may compute ||W||_c in another order than at init.
  np.testing.assert_allclose(np.asarray(fwd(model, ids)), np.asarray(fwd(base, ids)),
                             rtol=1e-6, atol=1e-6)
  q = model.layers[0].attn.q_proj
  assert isinstance(q, lora.DoRALinear)
  np.testing.assert_allclose(np.asarray(q.magnitude[...]),
                             np.linalg.norm(np.asarray(q.base.kernel[...]), axis=0), rtol=1e-6)
  counts = lora.count_params(model)
  n_mag = sum(m.base.out_features for _, m in nnx.iter_modules(model)
              if isinstance(m, lora.DoRALinear))
  assert n_mag > 0 and counts["adapter"] == n_mag + sum(
      m.lora_a[...].size + m.lora_b[...].size for _, m in nnx.iter_modules(model)
      if isinstance(m, lora.DoRALinear))


@pytest.mark.parametrize("config,targets", [
    (llama_config, lora.DEFAULT_TARGETS),
    (gpt2_config, r".*(q_proj|v_proj|fc2)"),  # fused c_attn with an untargeted k
], ids=["llama", "gpt2_q_v"])
def test_trained_dora_matches_peft(tmp_path, config, targets):
  save_hf(config(), tmp_path / "base")
  model = dora_model(tmp_path / "base", targets)
  mag0 = np.asarray(model.layers[0].attn.q_proj.magnitude[...])
  if config is llama_config:
    train(model, jnp.asarray(random_ids(5, (4, 12))))
  else:  # random non-zero A, B and magnitudes
    key = jax.random.key(3)
    for _, m in nnx.iter_modules(model):
      if isinstance(m, lora.DoRALinear):
        key, k1, k2 = jax.random.split(key, 3)
        m.lora_b[...] = 0.3 * jax.random.normal(k1, m.lora_b[...].shape)
        m.magnitude[...] = m.magnitude[...] * jax.random.uniform(k2, m.magnitude[...].shape,
                                                                 minval=0.5, maxval=1.5)
  assert np.abs(np.asarray(model.layers[0].attn.q_proj.magnitude[...]) - mag0).max() > 1e-3
  ids = random_ids(3)
  ours = np.asarray(model(jnp.asarray(ids)))
  out = peft_io.export_peft(model, tmp_path / "adapter", str(tmp_path / "base"))
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["use_dora"] is True
  tensors = safetensors.numpy.load_file(str(out / "adapter_model.safetensors"))
  mags = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
  assert mags and len(mags) * 3 == len(tensors)
  base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
  theirs = torch_logits(peft.PeftModel.from_pretrained(base, str(out)).eval(), ids)
  scale = np.abs(theirs).max()
  np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=RTOL * scale)
  merged = np.asarray(lora.merge_into_base(model)(jnp.asarray(ids)))
  np.testing.assert_allclose(merged, theirs, rtol=RTOL, atol=RTOL * scale)
  plain = torch_logits(
      transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval(), ids)
  assert np.abs(plain - theirs).max() > 100 * RTOL * scale  # the adapter changes the logits


def _keys_like(tree, key):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


def test_albat_scores_on_dora_match_brute_force(tmp_path):
  save_hf(llama_config(), tmp_path / "base")
  model = dora_model(tmp_path / "base", r".*(q_proj|v_proj|down_proj)")
  graphdef, phi0, rest = lora.split(model)
  phi_s = jax.jit(lambda phi, keys: jax.tree.map(  # a random step on A, B and the magnitudes
      lambda p, k: p + 0.2 * jax.random.normal(k, p.shape) * (1 + jnp.abs(p)), phi, keys))(
          phi0, _keys_like(phi0, jax.random.key(7)))
  tokens = jnp.asarray(random_ids(9, (5, 12)))
  batch = {"tokens": tokens, "valid": jnp.ones(5, bool)}
  loss_fn = lambda a, b: nll_per_example(lora.merge(graphdef, a, rest), b["tokens"])

  # loss_diff: two plain models with the adapters merged into the kernels, NLL in float64.
  fwd = nnx.jit(lambda m, t: m(t))

  def brute_nll(adapter):
    m = lora.merge_into_base(lora.merge(graphdef, adapter, rest))
    logits = np.asarray(fwd(m, tokens[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    t = np.asarray(tokens[:, 1:])
    return -np.take_along_axis(logp, t[..., None], axis=-1)[..., 0].mean(axis=1)

  want = brute_nll(phi0) - brute_nll(phi_s)
  got = np.asarray(jax.jit(K.loss_diff, static_argnums=0)(loss_fn, phi0, phi_s, batch))
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  # align: -<grad l_i(phi0), phi_s - phi0>, gradients one example at a time.
  delta = K.tree_sub(phi_s, phi0)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  grad_i = jax.jit(jax.grad(lambda a, t: loss_fn(a, {"tokens": t})[0]))
  rows = np.asarray(tokens)
  want = np.array([-flat(grad_i(phi0, rows[i:i + 1])) @ flat(delta) for i in range(5)])
  align = jax.jit(functools.partial(K.align, loss_fn))
  got = np.asarray(align(phi0, delta, batch))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # The magnitudes carry gradient: the score changes when only they move.
  mag_only = jax.tree.map(lambda d: d, delta)
  for path, v in nnx.to_flat_state(mag_only):
    if path[-1] != "magnitude":
      v[...] = jnp.zeros_like(v[...])
  assert np.abs(np.asarray(align(phi0, mag_only, batch))).max() > 0
