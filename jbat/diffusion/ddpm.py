"""DDPM noise schedule, epsilon-prediction losses and a DDIM sampler.

Forward process (DDPM, linear betas): beta_t = linspace(1e-4, 0.02, T), alpha_bar_t =
prod_{s<=t} (1 - beta_s), and for t in [0, T)

  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,    eps ~ N(0, I).

The network F_theta (jbat.diffusion.denoiser) is wrapped into the eps-predictor

  eps_theta(x_t, t, c) = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) F_theta(x_t, t, c)

(`predict_eps`). Then x0_hat = (x_t - sqrt(1 - ab) eps_theta) / sqrt(ab) = sqrt(ab) x_t -
sqrt(1 - ab) F_theta: an O(1) error of the network gives an O(1) error of x0_hat at every t,
whereas a plain eps-network's error is amplified by 1 / sqrt(ab_t) (~160 at t = T-1), which made
DDIM samples of a small CPU-trained model saturate patch by patch. The loss is unchanged: the
epsilon-prediction MSE of eps_theta.

The denoiser predicts eps; the per-example loss is l(x_0) = E_{t, eps} ||eps_theta(x_t, t, c) -
eps||^2 / (H W C). Two estimators of it:

  * `train_loss(model, batch, rng)`: one (t, eps) per row drawn from the step's PRNG key, rows
    weighted by batch["weight"] (the weights of a batch sum to 1): the training objective.
  * `per_example_loss(model, batch)`: K draws per row that are part of the batch
    (batch["t"]: int32[B, K], batch["noise"]: f32[B, K, H, W, C]), made on the host by
    `seeded_draws` from each example's seed. The draws depend only on (seed, K, T), never on
    the batch composition, so held-out losses and ALBAT scores are deterministic. Timesteps are
    stratified: draw j lies in [j T / K, (j + 1) T / K), which lowers the variance.

DDIM (eta = 0) from x_{t_0} over timesteps t_0 > t_1 > ... > t_{S-1} >= 0:
  x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)           (optionally clipped to [-1, 1])
  x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps,       ab_prev = 1 after the last step.
With eps the true noise of x_{t_0} = q(x_0, t_0, eps), every step stays on the same
trajectory and the sampler returns x_0 (up to float rounding): a sanity check of the sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

T_STEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def alphas_cumprod(n_steps: int = T_STEPS) -> np.ndarray:
  """alpha_bar_t for t = 0..n_steps-1 of the linear DDPM schedule, float64[n_steps]."""
  betas = np.linspace(BETA_START, BETA_END, n_steps, dtype=np.float64)
  return np.cumprod(1.0 - betas)


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, acp: jax.Array) -> jax.Array:
  """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; t int[B], x0/noise f32[B, H, W, C]."""
  ab = acp[t].astype(jnp.float32)[:, None, None, None]
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def _acp() -> jax.Array:
  return jnp.asarray(alphas_cumprod(), jnp.float32)


def _key(rng: jax.Array) -> jax.Array:
  """A typed PRNG key from either a typed key or raw uint32 key data."""
  return rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)


def predict_eps(model, xt: jax.Array, t: jax.Array, label: jax.Array,
                ident: jax.Array) -> jax.Array:
  """eps_theta = sqrt(1 - ab_t) x_t + sqrt(ab_t) F_theta(x_t, t, label, ident). f32[B,H,W,C]."""
  ab = _acp()[t][:, None, None, None]
  return jnp.sqrt(1.0 - ab) * xt + jnp.sqrt(ab) * model(xt, t, label, ident)


def train_loss(model, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """sum_i weight_i ||eps_theta(x_t_i, t_i, c_i) - eps_i||^2 / (HWC), t_i ~ U{0..T-1}.

  batch: x f32[B,H,W,C], label int32[B], ident int32[B], weight f32[B]. Returns f32[].
  A module-level function (a static argument of `loop.fit`'s jitted step).
  """
  x0 = batch["x"]
  k_t, k_n = jax.random.split(_key(rng))
  t = jax.random.randint(k_t, (x0.shape[0],), 0, T_STEPS)
  noise = jax.random.normal(k_n, x0.shape, x0.dtype)
  pred = predict_eps(model, q_sample(x0, t, noise, _acp()), t, batch["label"], batch["ident"])
  mse = jnp.mean(jnp.square(pred - noise), axis=(1, 2, 3))
  return jnp.sum(batch["weight"] * mse)


def per_example_loss(model, batch: dict[str, jax.Array]) -> jax.Array:
  """l_i = mean_k ||eps_theta(x_t_ik, t_ik, c_i) - noise_ik||^2 / (HWC), f32[B].

  batch: x f32[B,H,W,C], t int32[B,K], noise f32[B,K,H,W,C], label/ident int32[B]. Row i
  depends only on row i (one forward of B*K images).
  """
  x0, t, noise = batch["x"], batch["t"], batch["noise"]
  b, k = t.shape
  flat = lambda a: a.reshape((b * k,) + a.shape[2:])
  rep = lambda a: jnp.repeat(a, k, axis=0)
  xt = q_sample(rep(x0), flat(t), flat(noise), _acp())
  pred = predict_eps(model, xt, flat(t), rep(batch["label"]), rep(batch["ident"]))
  mse = jnp.mean(jnp.square(pred - flat(noise)), axis=(1, 2, 3))
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


def ddim_sample(eps_fn: Callable[[jax.Array, jax.Array], jax.Array], x_start: jax.Array,
                timesteps: np.ndarray, *, clip: bool = True,
                acp: np.ndarray | None = None) -> jax.Array:
  """Deterministic DDIM (eta = 0) from x_start at timesteps[0] down to x_0. f32[B,H,W,C].

  eps_fn(x, t) -> predicted noise, t int32[B]. `timesteps` strictly decreasing (host array).
  One `lax.scan` over the steps, so eps_fn is traced (and compiled) once.
  """
  acp = alphas_cumprod() if acp is None else acp
  ts = np.asarray(timesteps, np.int32)
  ab = acp[ts].astype(np.float32)
  ab_prev = np.append(acp[ts[1:]], 1.0).astype(np.float32)
  b = x_start.shape[0]

  def step(x, inputs):
    t, a, a_prev = inputs
    eps = eps_fn(x, jnp.full((b,), t, jnp.int32))
    x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps, None

  x, _ = jax.lax.scan(step, x_start, (jnp.asarray(ts), jnp.asarray(ab), jnp.asarray(ab_prev)))
  return x


def guided_eps(model, x: jax.Array, t: jax.Array, label: jax.Array, ident: jax.Array,
               null_label: int, scale: float) -> jax.Array:
  """Classifier-free guidance: eps_u + scale (eps_c - eps_u); scale 1: the conditional eps.

  eps_u uses the null label and no identifier. One forward of 2B images (B if scale == 1).
  """
  if scale == 1.0:
    return predict_eps(model, x, t, label, ident)
  b = x.shape[0]
  both = predict_eps(model, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
               jnp.concatenate([label, jnp.full_like(label, null_label)]),
               jnp.concatenate([ident, jnp.zeros_like(ident)]))
  cond, uncond = both[:b], both[b:]
  return uncond + scale * (cond - uncond)
