"""Evaluation of a denoiser: seeded per-example losses, DDIM samples, sample metrics, and the
denoiser as a `jbat.scorable.Scorable` (what the surrogate and pool scoring streams need)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jbat import lora, scorable
from jbat.data import images
from jbat.diffusion import classifier as clf_lib
from jbat.diffusion import ddpm
from jbat.diffusion.denoiser import Denoiser


IMAGE_KEYS = ("x", "t", "noise", "label", "ident")


def hash_images(h, examples) -> None:
  """Feeds image examples ({"id", "x", "label", "ident"}, in order) to a hashlib object."""
  for ex in examples:
    h.update(np.asarray([ex["id"], ex["label"], ex["ident"]], np.int64).tobytes())
    x = np.ascontiguousarray(ex["x"], np.float32)
    h.update(np.asarray(x.shape, np.int64).tobytes() + x.tobytes())


def image_scorable(n_draws: int, shape: tuple[int, ...], seed_offset: int) -> scorable.Scorable:
  """The denoiser as a Scorable: examples {"id", "x" f32[H,W,C], "label", "ident"}; the loss
  is `ddpm.per_example_loss` over `n_draws` (t, noise) draws seeded by id + seed_offset
  (ddpm.seeded_draws), so an image's loss does not depend on its batch or pool. Padding rows
  repeat row 0 (as `images.eval_rows`), so every row is a real image."""
  shape = tuple(int(d) for d in shape)

  def make_batch(part, rows: int) -> dict[str, np.ndarray]:
    valid = np.arange(rows) < len(part)
    ids = np.full(rows, -1, np.int64)
    ids[:len(part)] = [ex["id"] for ex in part]
    if not part:  # A process with no rows of a short last batch.
      part = [{"id": 0, "x": np.zeros(shape, np.float32), "label": 0, "ident": 0}]
    full = list(range(len(part))) + [0] * (rows - len(part))
    seeds = np.asarray([part[i]["id"] for i in full], np.int64) + seed_offset
    t, noise = ddpm.seeded_draws(seeds, n_draws, shape)
    return {"x": np.stack([np.asarray(part[i]["x"], np.float32) for i in full]),
            "label": np.asarray([part[i]["label"] for i in full], np.int32),
            "ident": np.asarray([part[i]["ident"] for i in full], np.int32),
            "t": t, "noise": noise, "valid": valid, "id": ids}

  return scorable.Scorable(loss=ddpm.per_example_loss, make_batch=make_batch,
                           hash_examples=hash_images, batch_keys=IMAGE_KEYS,
                           settings={"model": "denoiser", "n_draws": int(n_draws),
                                     "seed_offset": int(seed_offset), "shape": list(shape)})


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _losses(adapter, rest, batch, *, graphdef):
  return ddpm.per_example_loss(lora.merge(graphdef, adapter, rest), batch)


def per_example_losses(model: Denoiser, x: np.ndarray, label: int, ident: int, n_draws: int,
                       batch_size: int, seed_offset: int = 0) -> np.ndarray:
  """Seeded per-example denoising losses f32[N] of images x under prompt (label, ident).

  Example i draws its (t, noise) from seed `seed_offset + i` (ddpm.seeded_draws).
  """
  graphdef, adapter, rest = lora.split(model)
  n = len(x)
  rows = images.eval_rows(x, np.full(n, label), np.full(n, ident),
                          seed_offset + np.arange(n), n_draws, batch_size, ddpm.seeded_draws)
  out = np.zeros(n, np.float32)
  for b in rows:
    keys = {k: b[k] for k in ("x", "t", "noise", "label", "ident")}
    vals = np.asarray(_losses(adapter, rest, keys, graphdef=graphdef))
    ok = b["valid"]
    out[b["index"][ok]] = vals[ok]
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "null_label", "guidance", "n_steps"))
def _sample(adapter, rest, x_start, label, ident, *, graphdef, null_label, guidance, n_steps):
  model = lora.merge(graphdef, adapter, rest)
  v_fn = lambda x, t: ddpm.guided_v(model, x, t, label, ident, null_label, guidance)
  return ddpm.ddim_sample(v_fn, x_start, ddpm.ddim_timesteps(n_steps))


def generate(model: Denoiser, n: int, label: int, ident: int, seed: int,
             config: ml_collections.ConfigDict) -> np.ndarray:
  """n DDIM samples f32[n, H, W, C] of prompt (label, ident) from noise seeded by `seed`."""
  graphdef, adapter, rest = lora.split(model)
  cfg = model.cfg
  gb = config.eval.gen_batch
  shape = (cfg.image_size, cfg.image_size, cfg.channels)
  noise = np.random.default_rng([seed, 11]).standard_normal((n,) + shape).astype(np.float32)
  out = []
  for lo in range(0, n, gb):
    chunk = noise[lo:lo + gb]
    m = len(chunk)
    if m < gb:
      chunk = np.concatenate([chunk, np.zeros((gb - m,) + shape, np.float32)])
    x = _sample(adapter, rest, jnp.asarray(chunk), jnp.full((gb,), label, jnp.int32),
                jnp.full((gb,), ident, jnp.int32), graphdef=graphdef,
                null_label=cfg.null_label, guidance=float(config.eval.guidance),
                n_steps=int(config.eval.sample_steps))
    out.append(np.asarray(x)[:m])
  return np.concatenate(out)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over all pairs (i, j) of <a_i, b_j> for L2-normalised rows (DINO / CLIP-I score)."""
  return float(np.mean(np.asarray(a, np.float64) @ np.asarray(b, np.float64).T))


def mean_pairwise_distance(e: np.ndarray) -> float:
  """Diversity: mean over pairs i != j of 1 - <e_i, e_j> (L2-normalised rows); 0 for n < 2."""
  e = np.asarray(e, np.float64)
  n = len(e)
  if n < 2:
    return 0.0
  g = e @ e.T
  return float(1.0 - (g.sum() - np.trace(g)) / (n * (n - 1)))


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((c + c.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to rows of a and b (FID's formula):
  ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), covariances with ddof 1.
  (C_a^1/2 C_b C_a^1/2 is symmetric PSD with the eigenvalues of C_a C_b.)"""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu = a.mean(0) - b.mean(0)
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  s = _sqrtm_psd(ca)
  w = np.linalg.eigvalsh((s @ cb @ s + (s @ cb @ s).T) / 2)
  return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2.0 * np.sum(np.sqrt(np.clip(w, 0, None))))


def subject_metrics(samples: np.ndarray, clf: clf_lib.Classifier, cls: int,
                    subject_emb: np.ndarray) -> dict[str, float]:
  """"[V] <class>" samples: subject fidelity (mean cosine to the subject's images) and prompt
  fidelity (fraction classified as the class)."""
  pred, emb = clf_lib.predict(clf, samples)
  return {"subject_fid": mean_cosine(emb, subject_emb),
          "prompt_fid": float(np.mean(pred == cls))}


def class_metrics(samples: np.ndarray, clf: clf_lib.Classifier, cls: int,
                  real_emb: np.ndarray) -> dict[str, float]:
  """"<class>" samples: class preservation (fraction classified as the class), diversity
  (mean pairwise embedding distance) and the Frechet distance to real test images."""
  pred, emb = clf_lib.predict(clf, samples)
  return {"class_pres": float(np.mean(pred == cls)), "diversity": mean_pairwise_distance(emb),
          "frechet": frechet_distance(emb, real_emb)}
