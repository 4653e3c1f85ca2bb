"""Diffusion pieces: denoiser shapes, seeded losses, LoRA at init, DDIM, classifier, image data."""

import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jbat import lora
from jbat import surrogate as surrogate_lib
from jbat.data import images
from jbat.diffusion import classifier as clf_lib
from jbat.diffusion import ddpm
from jbat.diffusion import evaluate
from jbat.diffusion import pretrain
from jbat.diffusion.denoiser import Denoiser, DenoiserConfig, make_denoiser, patchify, unpatchify
from jbat.errors import JbatError
from jbat.scoring import kernels, stream

CFG = DenoiserConfig(image_size=8, channels=1, patch=2, d_model=16, depth=2, n_heads=2,
                     mlp_ratio=2, n_classes=10, n_identifiers=2)
UNET = DenoiserConfig(image_size=8, channels=1, patch=1, d_model=16, n_heads=2, n_classes=10,
                      n_identifiers=2, arch="unet", widths=(8, 16))


def _model(seed=0, cfg=CFG):
  model = make_denoiser(cfg, rngs=nnx.Rngs(seed))
  # adaLN-Zero / zero output layers make a fresh model output exactly 0: perturb every
  # parameter so the tests see a generic network.
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _images(n, size=8, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 1)).astype(np.float32)


def _eval_batch(x, label, ident, seeds, k):
  t, noise = ddpm.seeded_draws(seeds, k, x.shape[1:])
  return {"x": jnp.asarray(x), "label": jnp.asarray(label, jnp.int32),
          "ident": jnp.asarray(ident, jnp.int32), "t": jnp.asarray(t),
          "noise": jnp.asarray(noise), "valid": jnp.ones(len(x), bool)}


# ----------------------------------------------------------------------------- denoiser


@pytest.mark.parametrize("size,patch", [(8, 2), (28, 4)])
def test_denoiser_output_shape_and_patch_roundtrip(size, patch):
  cfg = DenoiserConfig(image_size=size, patch=patch, d_model=16, depth=1, n_heads=2)
  model = _model(cfg=cfg)
  x = _images(3, size)
  out = model(jnp.asarray(x), jnp.array([0, 500, 999]), jnp.array([1, 2, 10]),
              jnp.array([0, 1, 0]))
  assert out.shape == (3, size, size, 1) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  p = patchify(jnp.asarray(x), patch)
  assert p.shape == (3, (size // patch) ** 2, patch * patch)
  np.testing.assert_array_equal(np.asarray(unpatchify(p, patch, size, 1)), x)
  # Patch 0 is the top-left p x p block.
  np.testing.assert_array_equal(np.asarray(p[0, 0]), x[0, :patch, :patch, 0].reshape(-1))


@pytest.mark.parametrize("patch,widths", [(1, (8, 16)), (2, (8, 16)), (1, (8, 8, 16))])
def test_unet_output_shape_and_rows_are_independent(patch, widths):
  cfg = DenoiserConfig(image_size=8, patch=patch, d_model=16, n_heads=2, arch="unet",
                       widths=widths)
  model = _model(cfg=cfg)
  x = jnp.asarray(_images(3))
  t, label, ident = jnp.array([0, 500, 999]), jnp.array([1, 2, 10]), jnp.array([0, 1, 0])
  out = model(x, t, label, ident)
  assert out.shape == (3, 8, 8, 1) and np.all(np.isfinite(np.asarray(out)))
  one = model(x[1:2], t[1:2], label[1:2], ident[1:2])
  np.testing.assert_allclose(np.asarray(one[0]), np.asarray(out[1]), rtol=1e-4, atol=1e-5)
  other = model(x[1:2], t[1:2], jnp.array([3]), ident[1:2])
  assert not np.allclose(np.asarray(other), np.asarray(one))  # the class reaches the output


def test_denoiser_config_errors_name_the_field():
  with pytest.raises(JbatError, match="model.patch"):
    DenoiserConfig(image_size=8, patch=3).validate()
  with pytest.raises(JbatError, match="model.n_heads"):
    DenoiserConfig(d_model=10, n_heads=4).validate()
  with pytest.raises(JbatError, match="model.arch"):
    DenoiserConfig(arch="vae").validate()
  with pytest.raises(JbatError, match="model.widths"):
    DenoiserConfig(image_size=28, patch=2, arch="unet", widths=(8, 8, 8)).validate()  # 14 / 4
  with pytest.raises(JbatError, match="model.widths"):
    DenoiserConfig(arch="unet", widths=(12,)).validate()  # not a multiple of the groups


def test_conditioning_changes_the_prediction_and_rows_are_independent():
  model = _model()
  x = jnp.asarray(_images(4))
  t = jnp.array([10, 10, 10, 10])
  out = model(x, t, jnp.array([1, 2, 1, 1]), jnp.array([0, 0, 1, 0]))
  assert not np.allclose(out[0], out[1])  # another class
  single = model(x[3:4], t[3:4], jnp.array([1]), jnp.array([0]))
  np.testing.assert_allclose(np.asarray(single[0]), np.asarray(out[3]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- losses


def test_per_example_loss_is_deterministic_and_matches_brute_force():
  model = _model()
  x = _images(5)
  batch = _eval_batch(x, [1, 2, 3, 4, 5], [0, 1, 0, 2, 0], np.arange(5) + 40, 3)
  a = np.asarray(ddpm.per_example_loss(model, batch))
  b = np.asarray(ddpm.per_example_loss(model, batch))
  np.testing.assert_array_equal(a, b)
  # Brute force: one (t, noise) draw at a time.
  acp = ddpm.alphas_cumprod()
  for i in range(5):
    vals = []
    for k in range(3):
      t = int(batch["t"][i, k])
      noise = np.asarray(batch["noise"][i, k])
      xt = np.sqrt(acp[t]) * x[i] + np.sqrt(1 - acp[t]) * noise
      f = np.asarray(model(jnp.asarray(xt[None], jnp.float32), jnp.array([t]),
                           batch["label"][i:i + 1], batch["ident"][i:i + 1]))[0]
      v = np.sqrt(acp[t]) * noise - np.sqrt(1 - acp[t]) * x[i]  # the velocity target
      vals.append(np.mean((f - v) ** 2))
    np.testing.assert_allclose(a[i], np.mean(vals), rtol=2e-5)
  # The draws depend only on the seed, not on the batch the example sits in.
  sub = _eval_batch(x[[3, 0]], [4, 1], [2, 0], np.array([43, 40]), 3)
  np.testing.assert_allclose(np.asarray(ddpm.per_example_loss(model, sub)), a[[3, 0]],
                             rtol=1e-5)


def test_seeded_draws_are_stratified_and_reproducible():
  t, noise = ddpm.seeded_draws(np.array([3, 4, 3]), 4, (2, 2, 1))
  assert t.shape == (3, 4) and noise.shape == (3, 4, 2, 2, 1)
  np.testing.assert_array_equal(t[0], t[2])
  np.testing.assert_array_equal(noise[0], noise[2])
  assert not np.array_equal(noise[0], noise[1])
  for j in range(4):  # draw j lies in stratum [j T / 4, (j + 1) T / 4)
    assert np.all(t[:, j] >= j * 250) and np.all(t[:, j] < (j + 1) * 250)


def test_train_loss_is_deterministic_given_the_key_and_weights_rows():
  model = _model()
  x = jnp.asarray(_images(4))
  batch = {"x": x, "label": jnp.array([1, 2, 3, 4]), "ident": jnp.zeros(4, jnp.int32),
           "weight": jnp.full(4, 0.25)}
  key = jax.random.key(3)
  l1, l2 = ddpm.train_loss(model, batch, key), ddpm.train_loss(model, batch, key)
  assert float(l1) == float(l2)
  assert float(ddpm.train_loss(model, batch, jax.random.key(4))) != float(l1)
  # Raw key data (what loop.fit passes before wrapping) gives the same value.
  assert float(ddpm.train_loss(model, batch, jax.random.key_data(key))) == float(l1)
  zero_last = dict(batch, weight=jnp.array([0.5, 0.5, 0.0, 0.0]))
  zero_first = dict(batch, weight=jnp.array([0.0, 0.0, 0.5, 0.5]))
  total = ddpm.train_loss(model, zero_last, key) + ddpm.train_loss(model, zero_first, key)
  np.testing.assert_allclose(float(total), 2 * float(l1), rtol=1e-5)


# ----------------------------------------------------------------------------- LoRA


def test_cosine_schedule():
  acp = ddpm.alphas_cumprod()
  assert acp.shape == (ddpm.T_STEPS,) and np.all(np.diff(acp) < 0)
  assert acp[0] > 0.9999 and acp[-1] < 1e-6 and abs(acp[ddpm.T_STEPS // 2] - 0.49) < 0.02
  f = lambda u: np.cos((u / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(acp[:900], f(np.arange(1, 901)) / f(0), rtol=1e-9)


UNET_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|fc1|fc2|emb_proj)$"


@pytest.mark.parametrize("cfg", [CFG, UNET], ids=["dit", "unet"])
def test_lora_at_init_reproduces_the_backbone_bitwise(cfg):
  backbone = _model(cfg=cfg)
  adapted = nnx.clone(backbone)
  paths = lora.apply_lora(adapted, lora.LoRAConfig(rank=2, alpha=4.0, targets=UNET_TARGETS),
                          rngs=nnx.Rngs(1))
  if cfg.arch == "dit":
    assert "blocks.0.attn.q_proj" in paths and "blocks.1.fc2" in paths
    lora_b = "blocks.0.attn.q_proj.lora_b"
  else:
    assert "mid_attn.attn.q_proj" in paths and "down.0.emb_proj" in paths
    lora_b = "up.1.emb_proj.lora_b"
  x = jnp.asarray(_images(6))
  t = jnp.array([0, 1, 100, 500, 900, 999])
  label = jnp.array([0, 3, 7, 9, 10, 7])
  ident = jnp.array([0, 1, 2, 0, 0, 1])  # identifier rows are zero at init
  a = np.asarray(backbone(x, t, label, ident))
  b = np.asarray(adapted(x, t, label, ident))
  np.testing.assert_array_equal(a, b)
  f = nnx.jit(lambda m, x: m(x, t, label, ident))
  np.testing.assert_array_equal(np.asarray(f(backbone, x)), np.asarray(f(adapted, x)))
  # The identifier table is an adapter leaf, so LoRA-only training updates it.
  _, adapter, _ = lora.split(adapted)
  names = set(lora.adapter_to_flat(adapter))
  assert "ident_embed" in names and lora_b in names


def test_identifier_gets_gradient_through_the_kernels():
  model = _model()
  lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
  graphdef, phi0, rest = lora.split(model)
  batch = _eval_batch(_images(3), [7, 7, 7], [1, 1, 0], np.arange(3), 2)

  def loss_fn(adapter, b):
    return ddpm.per_example_loss(lora.merge(graphdef, adapter, rest), b)
  grads = kernels.per_example_grads(loss_fn, phi0, batch)
  g = np.asarray(grads["ident_embed"][...])
  assert np.abs(g[0, 0]).sum() > 0 and np.abs(g[1, 0]).sum() > 0
  np.testing.assert_array_equal(g[2], 0.0)  # no identifier in row 2
  np.testing.assert_array_equal(g[:, 1], 0.0)  # identifier 2 is never used


def test_image_scorable_batches_are_eval_rows_and_the_stream_scores_equal_the_kernel(tmp_path):
  # The denoiser through the shared scoring core: its batch maker gives the rows of
  # images.eval_rows (padding repeats row 0, draws seeded by id + offset), and
  # stream.score_pool's loss_diff equals kernels.loss_diff on those batches.
  x, label, ident = _images(5), np.array([1, 2, 3, 4, 5]), np.array([0, 1, 0, 1, 0])
  ids = np.array([3, 7, 11, 20, 21])
  model = evaluate.image_scorable(2, x.shape[1:], 1000)
  examples = [{"id": int(i), "x": xi, "label": int(li), "ident": int(di)}
              for i, xi, li, di in zip(ids, x, label, ident)]
  rows = images.eval_rows(x, label, ident, ids + 1000, 2, 4, ddpm.seeded_draws)
  for lo, ref in zip((0, 4), rows):
    b = model.make_batch(examples[lo:lo + 4], 4)
    for k in evaluate.IMAGE_KEYS + ("valid",):
      np.testing.assert_array_equal(b[k], ref[k])
    np.testing.assert_array_equal(b["id"], np.where(ref["valid"], ids[lo:lo + 4].tolist()
                                                    + [0] * (4 - len(ids[lo:lo + 4])), -1))
  net = _model()
  lora.apply_lora(net, lora.LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
  graphdef, phi0, rest = lora.split(net)
  phi_s = jax.tree.map(lambda a: np.asarray(a) + np.float32(0.05), phi0)
  sur = surrogate_lib.Surrogate(graphdef, jax.tree.map(np.asarray, phi0), phi_s, rest)
  table = stream.score_pool(["loss_diff"], sur, examples, tmp_path / "s",
                            stream.Batches(4, chunk_batches=1, model=model), progress=False)
  np.testing.assert_array_equal(table.ids, ids)
  loss_fn = surrogate_lib.per_example_loss_fn(graphdef, rest, ddpm.per_example_loss)
  want = np.concatenate([np.asarray(jax.jit(kernels.loss_diff, static_argnums=0)(
      loss_fn, sur.phi0, phi_s, {k: r[k] for k in evaluate.IMAGE_KEYS + ("valid",)}))[r["valid"]]
      for r in rows])
  np.testing.assert_allclose(table.scores["loss_diff"], want, rtol=1e-6, atol=1e-6)
  assert np.abs(want).max() > 0


# ----------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("n_steps", [1, 5, 50])
def test_ddim_with_the_true_velocity_recovers_the_input(n_steps):
  x0 = _images(4, seed=1)
  noise = np.random.default_rng(2).standard_normal(x0.shape).astype(np.float32)
  ts = ddpm.ddim_timesteps(n_steps)
  assert ts[0] == ddpm.T_STEPS - 1 and np.all(np.diff(ts) < 0)
  acp = ddpm.alphas_cumprod()
  x_start = jnp.asarray(np.sqrt(acp[ts[0]]) * x0 + np.sqrt(1 - acp[ts[0]]) * noise, jnp.float32)

  def v_fn(x, t):  # the velocity of x on the trajectory through (x0, noise)
    ab = jnp.asarray(acp, jnp.float32)[t][:, None, None, None]
    return jnp.sqrt(ab) * noise - jnp.sqrt(1 - ab) * x0
  out = ddpm.ddim_sample(v_fn, x_start, ts, clip=False)
  np.testing.assert_allclose(np.asarray(out), x0, atol=2e-4)


def test_ddim_one_step_matches_the_closed_form():
  x = jnp.asarray(_images(2))
  v = jnp.asarray(_images(2, seed=5))
  ts = np.array([600, 200], np.int32)
  acp = ddpm.alphas_cumprod()
  out = np.asarray(ddpm.ddim_sample(lambda x_, t: v, x, ts[:1], clip=False))
  want = np.sqrt(acp[600]) * np.asarray(x) - np.sqrt(1 - acp[600]) * np.asarray(v)  # x0_hat
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  two = np.asarray(ddpm.ddim_sample(lambda x_, t: v, x, ts, clip=False))
  a, b = acp[600], acp[200]
  x0 = want
  eps = (np.asarray(x) - np.sqrt(a) * x0) / np.sqrt(1 - a)
  x1 = np.sqrt(b) * x0 + np.sqrt(1 - b) * eps
  np.testing.assert_allclose(two, np.sqrt(b) * x1 - np.sqrt(1 - b) * np.asarray(v), rtol=1e-4,
                             atol=1e-4)


def test_guidance_scale_one_is_the_conditional_prediction():
  model = _model()
  x = jnp.asarray(_images(2))
  t, label, ident = jnp.array([5, 9]), jnp.array([1, 2]), jnp.array([0, 1])
  cond = np.asarray(ddpm.predict_v(model, x, t, label, ident))
  np.testing.assert_array_equal(np.asarray(ddpm.guided_v(model, x, t, label, ident, 10, 1.0)),
                                cond)
  unc = np.asarray(ddpm.predict_v(model, x, t, jnp.array([10, 10]), jnp.array([0, 0])))
  got = np.asarray(ddpm.guided_v(model, x, t, label, ident, 10, 3.0))
  np.testing.assert_allclose(got, unc + 3.0 * (cond - unc), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- EMA pretraining


def test_ema_update_matches_brute_force():
  ema, params = {"a": jnp.ones(3)}, {"a": jnp.arange(3.0)}
  for step, decay in ((0, 0.999), (5, 0.999), (1000, 0.9)):
    d = min(decay, (1 + step) / (10 + step))
    got = np.asarray(pretrain.ema_update(ema, params, step, decay)["a"])
    np.testing.assert_allclose(got, d * 1.0 + (1 - d) * np.arange(3.0), rtol=1e-6)


def test_pretrain_ema_resumes_to_the_same_weights(tmp_path):
  from jbat.training import loop
  x = _images(16)
  y = np.arange(16, dtype=np.int32) % 10
  src = [images.Source(x, y, np.zeros_like(y), rows=4)]
  spec = lambda ckpt: loop.TrainSpec(steps=4, lr=1e-2, warmup_steps=1, clip_norm=1.0,
                                     ckpt_every=ckpt, keep=1, log_every=2, seed=0)
  kw = dict(loss_fn=ddpm.train_loss, batch_keys=("x", "label", "ident", "weight"),
            progress=False)
  whole = pretrain.pretrain_ema(_model(), images.MixtureIterator(src, 0), spec(0), 0.9,
                                tmp_path / "a", **kw)
  # Interrupted during step 3 (after step 2's checkpoint), then resumed from it.
  half = spec(2)

  class Stop(Exception):
    pass

  class StopAfter(images.MixtureIterator):
    def __next__(self):
      if self.step == 3:
        raise Stop
      return super().__next__()
  with pytest.raises(Stop):
    pretrain.pretrain_ema(_model(), StopAfter(src, 0), half, 0.9, tmp_path / "b", **kw)
  assert (tmp_path / "b" / "state.npz").exists()
  resumed = pretrain.pretrain_ema(_model(), images.MixtureIterator(src, 0), half, 0.9,
                                  tmp_path / "b", **kw)
  for u, v in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
  first = jax.tree.leaves(nnx.state(_model(), nnx.Param))
  assert any(not np.allclose(np.asarray(a), np.asarray(b))
             for a, b in zip(first, jax.tree.leaves(whole)))


# ----------------------------------------------------------------------------- sample metrics


def _unit_rows(n, d, seed):
  e = np.random.default_rng(seed).standard_normal((n, d))
  return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_mean_cosine_and_pairwise_distance_match_brute_force():
  a, b = _unit_rows(5, 4, 0), _unit_rows(3, 4, 1)
  brute = np.mean([[a[i] @ b[j] for j in range(3)] for i in range(5)])
  assert abs(evaluate.mean_cosine(a, b) - brute) < 1e-12
  pairs = [1 - a[i] @ a[j] for i in range(5) for j in range(5) if i != j]
  assert abs(evaluate.mean_pairwise_distance(a) - np.mean(pairs)) < 1e-12
  assert evaluate.mean_pairwise_distance(np.repeat(a[:1], 4, axis=0)) < 1e-12  # no diversity


def test_frechet_distance_matches_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((400, 3))
  assert abs(evaluate.frechet_distance(a, a)) < 1e-6
  # Shift only: the squared mean difference.
  assert abs(evaluate.frechet_distance(a, a + [1.0, 2.0, 0.0]) - 5.0) < 1e-6
  # Diagonal covariances: sum_i (m_i^2 + (s_a,i - s_b,i)^2) on the sample statistics.
  b = rng.standard_normal((300, 3)) * [2.0, 0.5, 1.0] + [0.0, 1.0, 0.0]
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  import scipy.linalg
  brute = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb)
           - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb)).real)
  assert abs(evaluate.frechet_distance(a, b) - brute) < 1e-6
  assert evaluate.frechet_distance(b, a) == pytest.approx(evaluate.frechet_distance(a, b))


# ----------------------------------------------------------------------------- classifier


def test_classifier_predict_and_embedding_distance():
  cfg = clf_lib.ClassifierConfig(image_size=8, n_classes=10, width=4, embed_dim=8)
  model = clf_lib.Classifier(cfg, rngs=nnx.Rngs(0))
  x = _images(7)
  pred, emb = clf_lib.predict(model, x, batch_size=4)  # a padded last batch
  assert pred.shape == (7,) and emb.shape == (7, 8)
  np.testing.assert_array_equal(pred, np.argmax(np.asarray(model(jnp.asarray(x))), axis=-1))
  norms = np.linalg.norm(emb, axis=1)
  assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))
  a, b = emb[:3], emb[3:]
  brute = 1 - np.mean([[float(u @ v) for v in b] for u in a])
  assert abs(clf_lib.mean_cosine_distance(a, b) - brute) < 1e-6


# ----------------------------------------------------------------------------- image data


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
  arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
  with gzip.open(tmp_path / "x.gz", "wb") as f:
    f.write(header + arr.tobytes())
  np.testing.assert_array_equal(images.read_idx(tmp_path / "x.gz"), arr)
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(JbatError, match="not a uint8 idx file"):
    images.read_idx(tmp_path / "bad")


def test_digits_split_range_and_shapes():
  d = images.load_digits()
  assert d.train_x.shape[1:] == (8, 8, 1) and d.train_x.dtype == np.float32
  assert len(d.train_x) + len(d.test_x) == 1797 and abs(len(d.test_x) - 539) <= 1
  assert d.train_x.min() == -1.0 and d.train_x.max() == 1.0
  assert set(np.unique(d.test_y)) == set(range(10))


def test_mixture_iterator_is_a_function_of_seed_and_step():
  x = _images(10)
  y = np.arange(10, dtype=np.int32)
  src = [images.Source(x, y, np.ones(10, np.int32), rows=3, weight=1.0),
         images.Source(x[:4], y[:4], np.zeros(4, np.int32), rows=2, weight=0.5)]
  it = images.MixtureIterator(src, seed=5)
  first = [next(it) for _ in range(4)]
  b = first[0]
  assert b["x"].shape == (5, 8, 8, 1) and b["valid"].all()
  np.testing.assert_allclose(b["weight"], [1 / 3] * 3 + [0.25] * 2)
  assert len(set(b["label"][:3].tolist())) == 3  # no repeats within a step
  it2 = images.MixtureIterator(src, seed=5)
  it2.set_state(it.get_state() | {"step": 2})
  for want in first[2:]:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  drop = images.MixtureIterator(src, seed=1, p_uncond=0.999, null_label=10)
  b = next(drop)
  assert np.all(b["label"] == 10) and np.all(b["ident"] == 0)


def test_eval_rows_pad_to_a_fixed_shape():
  x = _images(5)
  rows = images.eval_rows(x, np.arange(5), np.zeros(5), np.arange(5), 2, 4, ddpm.seeded_draws)
  assert [r["x"].shape[0] for r in rows] == [4, 4]
  assert rows[1]["valid"].tolist() == [True, False, False, False]
  assert rows[1]["index"].tolist() == [4, -1, -1, -1]
  t, _ = ddpm.seeded_draws(np.array([4]), 2, (8, 8, 1))
  np.testing.assert_array_equal(rows[1]["t"][0], t[0])


@pytest.mark.network
def test_fashion_mnist_fetch(tmp_path):
  import shutil
  if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
    pytest.skip("apt-get / dpkg not available")
  try:
    d = images.load_fashion_mnist(tmp_path)
  except JbatError as e:
    pytest.skip(f"package registry unreachable: {e}")
  assert d.train_x.shape == (60000, 28, 28, 1) and d.test_x.shape == (10000, 28, 28, 1)
  assert d.train_x.min() == -1.0 and d.train_x.max() == 1.0
  assert np.bincount(d.test_y).tolist() == [1000] * 10
