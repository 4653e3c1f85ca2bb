"""LESS as its authors run it (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted
Instruction Tuning"): warm-up LoRA checkpoints, Adam-preconditioned projected gradients.

  1. Warm-up: a LoRA adapter (from phi0) is trained with Adam for `epochs` epochs on a random
     `fraction` (default 5%) of the candidate pool, on a linear schedule (warm-up over
     `warmup_ratio` of the steps, then linear decay to 0); a checkpoint (adapter, Adam moments
     m and v) is kept at the end of every epoch, weighted by the mean learning rate of its epoch.
  2. Features at checkpoint c: for a pool example the Adam update direction of its gradient g
     from that checkpoint's moments (no bias correction, eps inside the square root, as LESS):

       u = (beta1 m + (1 - beta1) g) / sqrt(beta2 v + (1 - beta2) g^2 + eps),

     for an adaptation example its plain gradient g; both flattened, projected to d dims by
     the seeded Rademacher matrix of `kernels.project_flat`, and normalised to unit length.
  3. Score of pool example z: max over adaptation examples a of
     sum_c w_c <f_c(z), f_c(a)> with w_c the checkpoint weights normalised to sum 1 (LESS's
     matching: the learning-rate-weighted sum of cosines, then the max over target examples).

Everything here is a pure function of its inputs (pool subset drawn from the seed), so the
kernels are tested against brute force; `stream.score_pool` runs the warm-up once per run and
streams the pool through `score_batch`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jbat.errors import JbatError
from jbat.scoring import kernels

PyTree = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[PyTree, Batch], jax.Array]

# Names the procedure below (fingerprinted with the scores, so older scores are not reused).
LESS_VERSION = "less-warmup-v1"


@dataclasses.dataclass(frozen=True)
class LessWarmup:
  """Settings of LESS's warm-up training and features (defaults: the paper's, except lr,
  which LESS sets for 7B models with rank-128 LoRA; jbat's default LoRA training rate here)."""

  fraction: float = 0.05  # Share of the pool trained on (at least one batch of examples).
  epochs: int = 4  # One checkpoint per epoch.
  lr: float = 2e-4  # Peak learning rate of the linear schedule.
  warmup_ratio: float = 0.03  # Share of the steps of linear warm-up.
  proj_dim: int = 8192  # Projection size of the gradient features.
  beta1: float = 0.9
  beta2: float = 0.999
  eps: float = 1e-8
  # Warm-up training batch; None: the batch of the pool pass (stream.Batches.batch_size). Set
  # it to score the pool at a larger batch (the per-example projection is cheaper per example
  # in bigger batches) without changing the warm-up.
  batch_size: int | None = None

  def __post_init__(self):
    if not 0.0 < float(self.fraction) <= 1.0:
      raise JbatError(f"less: warm-up fraction must be in (0, 1], got {self.fraction!r}")
    if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
      raise JbatError(f"less: warm-up epochs must be an int >= 1, got {self.epochs!r}")
    if not float(self.lr) > 0 or not 0.0 <= float(self.warmup_ratio) < 1.0:
      raise JbatError(f"less: lr must be > 0 and warmup_ratio in [0, 1), got {self.lr!r}, "
                      f"{self.warmup_ratio!r}")
    kernels._check_dim(self.proj_dim, "less")  # pylint: disable=protected-access
    if self.batch_size is not None and (not isinstance(self.batch_size, int)
                                        or isinstance(self.batch_size, bool)
                                        or self.batch_size < 1):
      raise JbatError(f"less: warm-up batch_size must be an int >= 1 or None, got "
                      f"{self.batch_size!r}")

  @classmethod
  def of(cls, proj_dim: int | None = None, batch_size: int | None = None) -> "LessWarmup":
    """The paper's settings with a projection size (None: LESS's 8192) and a warm-up batch
    (None: the pool pass's)."""
    return cls(**({} if proj_dim is None else {"proj_dim": int(proj_dim)}),
               batch_size=batch_size)

  def record(self) -> dict[str, Any]:
    """The settings as JSON values, with LESS_VERSION (for fingerprints). batch_size None (the
    pool pass's, which the fingerprint has anyway) is left out, as before it existed."""
    record = dataclasses.asdict(self)
    if record["batch_size"] is None:
      del record["batch_size"]
    return {**record, "version": LESS_VERSION, "projection": kernels.PROJECTION_VERSION}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One warm-up checkpoint: adapter, Adam moments (trees of the adapter), schedule weight."""

  phi: PyTree
  m: PyTree
  v: PyTree
  weight: float  # Mean learning rate of the epoch that ends here.


def warmup_indices(n_pool: int, fraction: float, seed: int, min_count: int = 1) -> np.ndarray:
  """Sorted positions of the warm-up subset: max(min_count, round(fraction * n_pool)) pool
  positions (at most n_pool) drawn without replacement by numpy's generator from `seed`."""
  count = min(n_pool, max(int(min_count), int(round(float(fraction) * n_pool))))
  rng = np.random.default_rng([int(seed), 0x1E55])
  return np.sort(rng.choice(n_pool, size=count, replace=False))


def linear_schedule(total_steps: int, lr: float, warmup_ratio: float) -> np.ndarray:
  """float64[total_steps]: the learning rate of each step, as HF's linear schedule:
  ceil(warmup_ratio * total) steps rising linearly from 0, then linear decay to 0."""
  warm = int(np.ceil(warmup_ratio * total_steps))
  s = np.arange(total_steps, dtype=np.float64)
  up = s / max(warm, 1)
  down = (total_steps - s) / max(total_steps - warm, 1)
  return lr * np.where(s < warm, up, down)


def adam_direction(g: jax.Array, m: jax.Array, v: jax.Array, beta1: float, beta2: float,
                   eps: float) -> jax.Array:
  """LESS's Adam-preconditioned gradient: (b1 m + (1-b1) g) / sqrt(b2 v + (1-b2) g^2 + eps),
  elementwise; g f32[B, n], m and v f32[n] (flat moments)."""
  m1 = beta1 * m + (1.0 - beta1) * g
  v1 = beta2 * v + (1.0 - beta2) * jnp.square(g)
  return m1 / jnp.sqrt(v1 + eps)


def _unit_rows(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay 0)."""
  n = jnp.linalg.norm(x, axis=1, keepdims=True)
  return jnp.where(n > 0, x / jnp.where(n > 0, n, 1.0), 0.0)


def features(loss_fn: LossFn, ckpt_phi: PyTree, batch: Batch, key: jax.Array, proj_dim: int,
             moments: tuple[PyTree, PyTree] | None = None, *, beta1: float = 0.9,
             beta2: float = 0.999, eps: float = 1e-8, words: jax.Array | None = None
             ) -> jax.Array:
  """f32[B, d]: unit-norm projected gradient features at one checkpoint (0 on invalid rows).

  With `moments` = (m, v) the Adam direction (`adam_direction`) of each gradient (pool
  examples); without, the plain gradient (adaptation examples). `words`: the packed matrix of
  `key` (`kernels.rademacher_words`), made once, so no signs are drawn per call; same result.
  """
  valid = kernels._valid(batch)  # pylint: disable=protected-access
  g = kernels.flatten_batched(kernels.per_example_grads(loss_fn, ckpt_phi, batch))
  if moments is not None:
    m, v = (kernels.flatten_batched(jax.tree.map(lambda x: x[None], t))[0] for t in moments)
    g = adam_direction(g, m, v, beta1, beta2, eps)
  f = _unit_rows(kernels.project_flat(g, key, proj_dim, words=words))
  return jnp.where(valid[:, None], f, 0.0)


def combine(pool_feats: jax.Array, adapt_feats: jax.Array, adapt_valid: jax.Array,
            weights: jax.Array) -> jax.Array:
  """LESS's matching: f32[B] = max over valid adaptation examples a of sum_c w_c <p_c, a_c>.

  pool_feats f32[C, B, d], adapt_feats f32[C, K, d], adapt_valid bool[K], weights f32[C]
  (normalised here to sum 1).
  """
  w = weights / jnp.sum(weights)
  sims = jnp.einsum("c,cbd,ckd->bk", w, pool_feats, adapt_feats,
                    precision=jax.lax.Precision.HIGHEST)
  return jnp.max(jnp.where(adapt_valid[None, :], sims, -jnp.inf), axis=1)


def stack_checkpoints(ckpts: Sequence[Checkpoint]) -> dict[str, Any]:
  """{"phi", "m", "v": trees with a leading checkpoint axis C, "weights": f32[C]}."""
  if not ckpts:
    raise JbatError("less: no warm-up checkpoints")
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return {"phi": stack([c.phi for c in ckpts]), "m": stack([c.m for c in ckpts]),
          "v": stack([c.v for c in ckpts]),
          "weights": jnp.asarray([c.weight for c in ckpts], jnp.float32)}


def adapt_features(loss_fn: LossFn, stacked: dict[str, Any], batch: Batch, key: jax.Array,
                   spec: LessWarmup, words: jax.Array | None = None) -> jax.Array:
  """f32[C, K, d]: plain-gradient features of one batch of adaptation examples per checkpoint
  (a `lax.map` over checkpoints, so one compiled body)."""
  return jax.lax.map(lambda phi: features(loss_fn, phi, batch, key, spec.proj_dim, words=words),
                     stacked["phi"])


def score_batch(loss_fn: LossFn, stacked: dict[str, Any], adapt_feats: jax.Array,
                adapt_valid: jax.Array, batch: Batch, key: jax.Array,
                spec: LessWarmup, words: jax.Array | None = None) -> jax.Array:
  """f32[B]: the LESS score of one pool batch (module docstring, steps 2-3); invalid rows 0."""
  def one(c):
    phi, m, v = c
    return features(loss_fn, phi, batch, key, spec.proj_dim, (m, v), beta1=spec.beta1,
                    beta2=spec.beta2, eps=spec.eps, words=words)
  pool_feats = jax.lax.map(one, (stacked["phi"], stacked["m"], stacked["v"]))
  out = combine(pool_feats, adapt_feats, adapt_valid, stacked["weights"])
  return jnp.where(kernels._valid(batch), out, 0.0)  # pylint: disable=protected-access


def adam_step(phi: PyTree, m: PyTree, v: PyTree, grad: PyTree, lr: jax.Array, step: jax.Array,
              beta1: float, beta2: float, eps: float) -> tuple[PyTree, PyTree, PyTree]:
  """One Adam step as torch.optim.AdamW with weight decay 0: moments updated, then
  phi -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), t = step + 1."""
  t = step.astype(jnp.float32) + 1.0
  m = jax.tree.map(lambda a, g: beta1 * a + (1.0 - beta1) * g, m, grad)
  v = jax.tree.map(lambda a, g: beta2 * a + (1.0 - beta2) * jnp.square(g), v, grad)
  c1, c2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
  phi = jax.tree.map(lambda p, a, b: p - lr * (a / c1) / (jnp.sqrt(b / c2) + eps), phi, m, v)
  return phi, m, v


def warmup_train(make_loss: Callable[[Any], LossFn], rest: Any, phi0: PyTree,
                 batches: Callable[[int], Any], steps_per_epoch: int,
                 spec: LessWarmup) -> list[Checkpoint]:
  """Adam from phi0 on the warm-up batches; one Checkpoint per epoch.

  `make_loss(rest)` is the per-example loss function (`rest`, e.g. the frozen backbone, is
  passed through jit as an argument); `batches(epoch)` yields the epoch's device batches
  (about `steps_per_epoch` of them, each with a `valid` mask); the training loss of a batch is
  the mean per-example loss over its valid rows.
  """
  total = spec.epochs * steps_per_epoch
  lrs = linear_schedule(total, spec.lr, spec.warmup_ratio)

  @jax.jit
  def step(rest, phi, m, v, batch, lr, t):
    def mean_loss(p):
      valid = batch["valid"].astype(jnp.float32)
      return jnp.sum(make_loss(rest)(p, batch) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    grad = jax.grad(mean_loss)(phi)
    return adam_step(phi, m, v, grad, lr, t, spec.beta1, spec.beta2, spec.eps)

  zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t)
  phi = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), phi0)
  m, v, t, out = zeros(phi0), zeros(phi0), 0, []
  for epoch in range(spec.epochs):
    first = t
    for batch in batches(epoch):
      phi, m, v = step(rest, phi, m, v, batch, jnp.float32(lrs[t]), jnp.int32(t))
      t += 1
    if t == first:
      raise JbatError("less: the warm-up subset gave no batches")
    out.append(Checkpoint(phi=phi, m=m, v=v, weight=float(np.mean(lrs[first:t]))))
  return out
