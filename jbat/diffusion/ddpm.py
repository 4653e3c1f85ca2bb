"""Cosine noise schedule, v-prediction losses and a DDIM sampler with classifier-free guidance.

Forward process (cosine schedule, Nichol & Dhariwal 2021): alpha_bar_t = f(t + 1) / f(0),
f(u) = cos(((u / T) + s) / (1 + s) * pi / 2)^2, s = 0.008, betas clipped to <= 0.999, and for
t in [0, T)

  x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps,    eps ~ N(0, I).

The network F_theta (jbat.diffusion.denoiser) predicts the velocity (v-prediction)

  v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0,   so   x0_hat = sqrt(ab) x_t - sqrt(1 - ab) F,
                                                   eps_hat = sqrt(1 - ab) x_t + sqrt(ab) F.

An O(1) error of F is an O(1) error of x0_hat at every t (a plain eps-network's error is
amplified by 1 / sqrt(ab_t) near t = T), and the target has unit variance at every t.

The per-example loss is l(x_0) = E_{t, eps} ||F_theta(x_t, t, c) - v||^2 / (H W C) (the
v-MSE: the eps-MSE weighted by 1 / ab_t, which keeps a learning signal at high noise where the
global shape of a sample is decided). Two estimators of it:

  * `train_loss(model, batch, rng)`: one (t, eps) per row drawn from the step's PRNG key, rows
    weighted by batch["weight"] (the weights of a batch sum to 1): the training objective.
  * `per_example_loss(model, batch)`: K draws per row that are part of the batch
    (batch["t"]: int32[B, K], batch["noise"]: f32[B, K, H, W, C]), made on the host by
    `seeded_draws` from each example's seed. The draws depend only on (seed, K, T), never on
    the batch composition, so held-out losses and ALBAT scores are deterministic. Timesteps are
    stratified: draw j lies in [j T / K, (j + 1) T / K), which lowers the variance.

DDIM (eta = 0) from x_{t_0} over timesteps t_0 > t_1 > ... > t_{S-1} >= 0, given v:
  x0_hat = sqrt(ab_t) x_t - sqrt(1 - ab_t) v                (optionally clipped to [-1, 1])
  eps_hat = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t)
  x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps_hat,   ab_prev = 1 after the last step.
With v the true velocity of x_{t_0} = q(x_0, t_0, eps), every step stays on the same
trajectory and the sampler returns x_0 (up to float rounding): a sanity check of the sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

T_STEPS = 1000
COSINE_S = 0.008
MAX_BETA = 0.999


def alphas_cumprod(n_steps: int = T_STEPS) -> np.ndarray:
  """alpha_bar_t for t = 0..n_steps-1 of the cosine schedule, float64[n_steps]."""
  u = np.arange(n_steps + 1, dtype=np.float64) / n_steps
  f = np.cos((u + COSINE_S) / (1 + COSINE_S) * np.pi / 2) ** 2
  betas = np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
  return np.cumprod(1.0 - betas)


def v_target(x0: jax.Array, t: jax.Array, noise: jax.Array, acp: jax.Array) -> jax.Array:
  """v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0; t int[B], x0/noise f32[B, H, W, C]."""
  ab = acp[t].astype(jnp.float32)[:, None, None, None]
  return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, acp: jax.Array) -> jax.Array:
  """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; t int[B], x0/noise f32[B, H, W, C]."""
  ab = acp[t].astype(jnp.float32)[:, None, None, None]
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def _acp() -> jax.Array:
  return jnp.asarray(alphas_cumprod(), jnp.float32)


def _key(rng: jax.Array) -> jax.Array:
  """A typed PRNG key from either a typed key or raw uint32 key data."""
  return rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)


def predict_v(model, xt: jax.Array, t: jax.Array, label: jax.Array,
              ident: jax.Array) -> jax.Array:
  """v_theta = F_theta(x_t, t, label, ident): the network's output. f32[B,H,W,C]."""
  return model(xt, t, label, ident)


def train_loss(model, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """sum_i weight_i ||v_theta(x_t_i, t_i, c_i) - v_i||^2 / (HWC), t_i ~ U{0..T-1}.

  batch: x f32[B,H,W,C], label int32[B], ident int32[B], weight f32[B]. Returns f32[].
  A module-level function (a static argument of `loop.fit`'s jitted step).
  """
  x0 = batch["x"]
  k_t, k_n = jax.random.split(_key(rng))
  t = jax.random.randint(k_t, (x0.shape[0],), 0, T_STEPS)
  noise = jax.random.normal(k_n, x0.shape, x0.dtype)
  acp = _acp()
  pred = predict_v(model, q_sample(x0, t, noise, acp), t, batch["label"], batch["ident"])
  mse = jnp.mean(jnp.square(pred - v_target(x0, t, noise, acp)), axis=(1, 2, 3))
  return jnp.sum(batch["weight"] * mse)


def per_example_loss(model, batch: dict[str, jax.Array]) -> jax.Array:
  """l_i = mean_k ||v_theta(x_t_ik, t_ik, c_i) - v_ik||^2 / (HWC), f32[B].

  batch: x f32[B,H,W,C], t int32[B,K], noise f32[B,K,H,W,C], label/ident int32[B]. Row i
  depends only on row i (one forward of B*K images).
  """
  x0, t, noise = batch["x"], batch["t"], batch["noise"]
  b, k = t.shape
  flat = lambda a: a.reshape((b * k,) + a.shape[2:])
  rep = lambda a: jnp.repeat(a, k, axis=0)
  acp = _acp()
  x0, t, noise = rep(x0), flat(t), flat(noise)
  pred = predict_v(model, q_sample(x0, t, noise, acp), t, rep(batch["label"]),
                   rep(batch["ident"]))
  mse = jnp.mean(jnp.square(pred - v_target(x0, t, noise, acp)), axis=(1, 2, 3))
  return jnp.mean(mse.reshape(b, k), axis=1)


def eval_sums(model, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(sum of `per_example_loss` over valid rows, number of valid rows): `loop.fit`'s eval_fn."""
  valid = batch["valid"].astype(jnp.float32)
  losses = per_example_loss(model, batch)
  return jnp.sum(jnp.where(valid > 0, losses, 0.0)), jnp.sum(valid)


def seeded_draws(seeds: np.ndarray, n_draws: int, shape: tuple[int, ...],
                 n_steps: int = T_STEPS) -> tuple[np.ndarray, np.ndarray]:
  """Per-example (t int32[N, K], noise f32[N, K, *shape]) from numpy Generator([7, seed_i]).

  Draw j of example i: t = floor((j + u) T / K) with u ~ U[0, 1) (stratified), then the noise.
  Depends only on (seed_i, K, shape, T).
  """
  seeds = np.asarray(seeds, dtype=np.int64)
  t = np.empty((len(seeds), n_draws), np.int32)
  noise = np.empty((len(seeds), n_draws) + tuple(shape), np.float32)
  for i, s in enumerate(seeds):
    rng = np.random.default_rng([7, int(s)])
    u = rng.random(n_draws)
    t[i] = np.minimum(((np.arange(n_draws) + u) * n_steps / n_draws).astype(np.int32),
                      n_steps - 1)
    noise[i] = rng.standard_normal((n_draws,) + tuple(shape), dtype=np.float32)
  return t, noise


def ddim_timesteps(n_sample_steps: int, n_steps: int = T_STEPS) -> np.ndarray:
  """S evenly spaced decreasing timesteps from T-1 down to 0 (S = 1: just T-1), int32[<=S]."""
  ts = np.linspace(n_steps - 1, 0, n_sample_steps).round().astype(np.int32)
  return np.unique(ts)[::-1].copy()


def ddim_sample(v_fn: Callable[[jax.Array, jax.Array], jax.Array], x_start: jax.Array,
                timesteps: np.ndarray, *, clip: bool = True,
                acp: np.ndarray | None = None) -> jax.Array:
  """Deterministic DDIM (eta = 0) from x_start at timesteps[0] down to x_0. f32[B,H,W,C].

  v_fn(x, t) -> predicted velocity, t int32[B]. `timesteps` strictly decreasing (host array).
  One `lax.scan` over the steps, so v_fn is traced (and compiled) once.
  """
  acp = alphas_cumprod() if acp is None else acp
  ts = np.asarray(timesteps, np.int32)
  ab = acp[ts].astype(np.float32)
  ab_prev = np.append(acp[ts[1:]], 1.0).astype(np.float32)
  b = x_start.shape[0]

  def step(x, inputs):
    t, a, a_prev = inputs
    v = v_fn(x, jnp.full((b,), t, jnp.int32))
    x0 = jnp.sqrt(a) * x - jnp.sqrt(1.0 - a) * v
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, None

  x, _ = jax.lax.scan(step, x_start, (jnp.asarray(ts), jnp.asarray(ab), jnp.asarray(ab_prev)))
  return x


def guided_v(model, x: jax.Array, t: jax.Array, label: jax.Array, ident: jax.Array,
             null_label: int, scale: float) -> jax.Array:
  """Classifier-free guidance: v_u + scale (v_c - v_u); scale 1: the conditional v (the
  same combination of eps, since eps_hat is affine in v at fixed x_t).

  v_u uses the null label and no identifier. One forward of 2B images (B if scale == 1).
  """
  if scale == 1.0:
    return predict_v(model, x, t, label, ident)
  b = x.shape[0]
  both = predict_v(model, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
               jnp.concatenate([label, jnp.full_like(label, null_label)]),
               jnp.concatenate([ident, jnp.zeros_like(ident)]))
  cond, uncond = both[:b], both[b:]
  return uncond + scale * (cond - uncond)
