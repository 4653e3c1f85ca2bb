"""Evaluation of a denoiser: seeded per-example losses, DDIM samples, sample metrics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jbat import lora
from jbat.data import images
from jbat.diffusion import classifier as clf_lib
from jbat.diffusion import ddpm
from jbat.diffusion.denoiser import Denoiser


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
  eps_fn = lambda x, t: ddpm.guided_eps(model, x, t, label, ident, null_label, guidance)
  return ddpm.ddim_sample(eps_fn, x_start, ddpm.ddim_timesteps(n_steps))


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


def sample_metrics(samples: np.ndarray, clf: clf_lib.Classifier, subject_class: int,
                    heldout_emb: np.ndarray) -> dict[str, float]:
  pred, emb = clf_lib.predict(clf, samples)
  return {"class_frac": float(np.mean(pred == subject_class)),
          "embed_dist": clf_lib.mean_cosine_distance(emb, heldout_emb)}
