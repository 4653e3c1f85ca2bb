"""Pretraining of the backbone denoiser with an exponential moving average (EMA) of its weights.

`loop.fit` trains and checkpoints one parameter set; a diffusion backbone is sampled from the
EMA of its weights (Ho et al. 2020; every DDPM / ADM / DiT since), which averages out the
noise of the last optimiser steps and draws visibly cleaner images from a short run. This
loop keeps both:

  params_s = AdamW step (warmup + cosine, global-norm clipping: `loop.make_optimizer`)
  ema_s    = d_s ema_{s-1} + (1 - d_s) params_s,    d_s = min(decay, (1 + s) / (10 + s))

(the warm-up of d_s keeps the early average from being dominated by the random init). One
jitted step; a checkpoint (params, EMA, optimiser state, step; numpy .npz written atomically)
every `ckpt_every` steps, so an interrupted pretraining resumes where it stopped and, with the
iterator a pure function of (seed, step), reaches the same weights. A non-finite loss raises
`Diverged` at the next log line.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jbat import io
from jbat.errors import Diverged
from jbat.training import loop


def ema_decay(step: int | jax.Array, decay: float) -> jax.Array:
  """d_s = min(decay, (1 + s) / (10 + s))."""
  s = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + s) / (10.0 + s))


def ema_update(ema, params, step, decay: float):
  """ema * d_s + params * (1 - d_s), leaf by leaf."""
  d = ema_decay(step, decay)
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "loss_fn", "decay"),
                   donate_argnums=(0, 1, 2))
def _step(params, ema, opt_state, rest, batch, key, step, *, graphdef, tx, loss_fn, decay):
  def f(p):
    return loss_fn(nnx.merge(graphdef, p, rest), batch, key)
  loss, grads = jax.value_and_grad(f)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = jax.tree.map(lambda p, u: p + u, params, updates)
  return params, ema_update(ema, params, step, decay), opt_state, loss


def _save(path: pathlib.Path, step: int, params, ema, opt_state) -> None:
  arrays = {f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
  arrays.update({f"e{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(ema))})
  arrays.update({f"o{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))})
  arrays["step"] = np.asarray(step, np.int64)
  path.parent.mkdir(parents=True, exist_ok=True)
  with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


def _load(path: pathlib.Path, params, ema, opt_state):
  with np.load(path) as z:
    def fill(tree, prefix):
      leaves, treedef = jax.tree.flatten(tree)
      return jax.tree.unflatten(treedef, [jnp.asarray(z[f"{prefix}{i}"], leaf.dtype)
                                          for i, leaf in enumerate(leaves)])
    return (int(z["step"]), fill(params, "p"), fill(ema, "e"), fill(opt_state, "o"))


def pretrain_ema(model: nnx.Module, train_iter, spec: loop.TrainSpec, decay: float,
                 workdir: pathlib.Path, *, loss_fn, batch_keys, progress: bool = True,
                 desc: str = "pretrain") -> nnx.State:
  """Trains every nnx.Param of `model` for spec.steps steps; returns the EMA weights (the
  model itself is left at its last raw weights). Resumes from workdir/state.npz."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = loop.make_optimizer(spec)
  params = jax.tree.map(jnp.asarray, params)
  ema = jax.tree.map(jnp.copy, params)
  opt_state = tx.init(params)
  ckpt = pathlib.Path(workdir) / "state.npz"
  start = 0
  if ckpt.exists():
    start, params, ema, opt_state = _load(ckpt, params, ema, opt_state)
    train_iter.set_state({"step": start})
  base_key = jax.random.key(spec.seed)
  bar = tqdm(total=spec.steps, initial=start, desc=desc, dynamic_ncols=True,
             disable=not progress)
  loss = None
  for step in range(start + 1, spec.steps + 1):
    batch = next(train_iter)
    b = {k: jnp.asarray(batch[k]) for k in batch_keys}
    params, ema, opt_state, loss = _step(
        params, ema, opt_state, rest, b, jax.random.fold_in(base_key, step),
        jnp.int32(step), graphdef=graphdef, tx=tx, loss_fn=loss_fn, decay=float(decay))
    if step % spec.log_every == 0 or step == spec.steps:
      value = float(loss)
      if not np.isfinite(value):
        raise Diverged(step, "loss", desc, spec.lr)
      bar.set_postfix(loss=f"{value:.4f}")
    if (spec.ckpt_every and step % spec.ckpt_every == 0) and step < spec.steps:
      _save(ckpt, step, params, ema, opt_state)
    bar.update(1)
  bar.close()
  nnx.update(model, params)
  return ema
