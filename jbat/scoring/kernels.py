"""Pure, model-agnostic ALBAT scoring kernels (docs/method.md, "Scores").

Every kernel takes a per-example loss function

  loss_fn(adapter, batch) -> f32[B]

where `adapter` is any pytree of float arrays (a dict, an `nnx.State` of LoRA parameters, ...)
and `batch` is a dict of arrays sharing a leading batch axis B that includes `"valid"`: bool[B]
(padding rows are False). `loss_fn` must be per-example: row i of its output may depend only on
row i of the batch (no batch statistics). The kernels never normalise across the batch, so
padding rows cannot change the scores of valid rows, and every kernel returns exactly 0.0 for
invalid rows (masked with `jnp.where`, so a NaN or inf loss on a padding row stays there).

Jit style: the kernels are plain pure functions with `loss_fn` as their first argument. Jit them
by closing over the loss, e.g. `jit_kernel(align, loss_fn)` (which is
`jax.jit(functools.partial(align, loss_fn))`), or `jax.jit(align, static_argnums=0)`.
Structure checks (delta vs phi0) run at trace time, so they cost nothing per call.

Cost, in units of one forward pass F of the batch (docs/method.md, "Cost model"):
  align 2F, loss_diff 2F, per-example gradients ~3F plus B x |phi| floats of memory (cosine,
  grad_norm, surrogate_fit, less, mean_grad), random 0F. `less` with projection adds a
  B x |phi| x d matmul (project the target once with `project_target`; pass the packed matrix
  `rademacher_words` to skip the per-call random-number generation).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jbat.errors import JbatError
from jbat.trees import check_same_structure, tree_sub  # noqa: F401 (part of this API)

PyTree = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[PyTree, Batch], jax.Array]

# Default number of parameter rows per generated Rademacher block (see `project`).
PROJ_BLOCK = 4096


# ----------------------------------------------------------------------------- pytree helpers


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  """<a, b> = sum over leaves of sum(a_leaf * b_leaf), accumulated in float32. Returns f32[]."""
  parts = jax.tree.leaves(jax.tree.map(
      lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)), a, b))
  return functools.reduce(jnp.add, parts, jnp.zeros((), jnp.float32))


def tree_norm(a: PyTree) -> jax.Array:
  """||a||_2 over all leaves, in float32. Returns f32[]."""
  return jnp.sqrt(tree_dot(a, a))


def _batched_dot(a: PyTree, b: PyTree) -> jax.Array:
  """Per-example <a_i, b>: `a` has a leading axis B on every leaf, `b` has none. f32[B]."""
  def leaf_dot(x, y):
    x = x.astype(jnp.float32).reshape(x.shape[0], -1)
    return x @ y.astype(jnp.float32).reshape(-1)
  parts = jax.tree.leaves(jax.tree.map(leaf_dot, a, b))
  return functools.reduce(jnp.add, parts)


def _batched_sq_norm(a: PyTree) -> jax.Array:
  """Per-example ||a_i||^2 for a pytree whose leaves all have leading axis B. f32[B]."""
  parts = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
           for x in jax.tree.leaves(a)]
  return functools.reduce(jnp.add, parts)


# ----------------------------------------------------------------------------- validation


def _valid(batch: Batch) -> jax.Array:
  """The batch's validity mask as bool[B]; JbatError if the batch has no "valid" entry."""
  if not isinstance(batch, dict) or "valid" not in batch:
    got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise JbatError("scoring batch: expected a dict with a 'valid' bool[B] entry "
                    f"(padding rows False), got {got}")
  return jnp.asarray(batch["valid"]).astype(bool)


def _mask(valid: jax.Array, x: jax.Array, fill: float = 0.0) -> jax.Array:
  """x where valid else `fill`, as float32 (valid is bool[B], x is [B])."""
  return jnp.where(valid, x.astype(jnp.float32), jnp.float32(fill))


# ----------------------------------------------------------------------------- kernels


def align(loss_fn: LossFn, phi0: PyTree, delta: PyTree, batch: Batch) -> jax.Array:
  """ALBAT alignment score: s_i = -<grad_phi l(z_i; phi0), delta>. Returns f32[B].

  Computed exactly for the whole batch with ONE forward-mode product: the tangent of the loss
  vector phi -> [l(z_1; phi), ..., l(z_B; phi)] at phi0 along delta is the vector of
  directional derivatives <grad l(z_i; phi0), delta>. No per-example gradient is materialised.
  Positive s_i: one SGD step on z_i moves the adapter toward the surrogate optimum.

  Cost: ~2F (primal + tangent), independent of |phi|; memory of one forward.
  Raises JbatError at trace time if `delta` differs from `phi0` in structure or leaf shapes.
  Invalid rows score 0.
  """
  check_same_structure(phi0, delta)
  valid = _valid(batch)
  delta = jax.tree.map(lambda d, p: d.astype(p.dtype), delta, phi0)
  _, tangent = jax.jvp(lambda p: loss_fn(p, batch), (phi0,), (delta,))
  return _mask(valid, -tangent)


def loss_diff(loss_fn: LossFn, phi0: PyTree, phi_s: PyTree, batch: Batch) -> jax.Array:
  """s_i = l(z_i; phi0) - l(z_i; phi_s): the path integral of the alignment from phi0 to phi_s.

  Exact (no linearisation). Cost: 2F. Invalid rows score 0. Returns f32[B].
  """
  check_same_structure(phi0, phi_s, name="phi_s")
  valid = _valid(batch)
  return _mask(valid, loss_fn(phi0, batch).astype(jnp.float32)
               - loss_fn(phi_s, batch).astype(jnp.float32))


def relative_diff(l0: jax.Array, ls: jax.Array, valid: jax.Array) -> jax.Array:
  """(l0 - ls) / l0 where the row is valid and l0 > 0, else 0 (f32[B] losses in, f32[B] out):
  the one definition of `rel_loss_diff`, also used where l0 and ls are computed anyway."""
  ok = valid & (l0 > 0)
  return jnp.where(ok, (l0 - ls) / jnp.where(ok, l0, 1.0), 0.0)


def rel_loss_diff(loss_fn: LossFn, phi0: PyTree, phi_s: PyTree, batch: Batch) -> jax.Array:
  """s_i = (l(z_i; phi0) - l(z_i; phi_s)) / l(z_i; phi0): the share of the example's loss the
  surrogate removes. 0 where l(z_i; phi0) <= 0 and on invalid rows. Cost: 2F. Returns f32[B].
  """
  check_same_structure(phi0, phi_s, name="phi_s")
  return relative_diff(loss_fn(phi0, batch).astype(jnp.float32),
                       loss_fn(phi_s, batch).astype(jnp.float32), _valid(batch))


def per_example_losses_and_grads(loss_fn: LossFn, phi: PyTree,
                                 batch: Batch) -> tuple[jax.Array, PyTree]:
  """(l(z_i; phi) f32[B], grad_phi l(z_i; phi) with leading axis B on every leaf).

  `jax.vmap(jax.value_and_grad(...))` over the rows of `batch`: each row is wrapped back into a
  batch of 1 (leading dim 1) before calling `loss_fn`. Invalid rows get loss 0 and gradient 0.
  Cost: ~3F; memory B x |phi| floats for the gradients.
  """
  valid = _valid(batch)

  def row_loss(p, row):
    return loss_fn(p, jax.tree.map(lambda x: x[None], row))[0]

  losses, grads = jax.vmap(jax.value_and_grad(row_loss), in_axes=(None, 0))(phi, batch)
  grads = jax.tree.map(
      lambda g: jnp.where(valid.reshape((-1,) + (1,) * (g.ndim - 1)), g, jnp.zeros_like(g)),
      grads)
  return _mask(valid, losses), grads


def per_example_grads(loss_fn: LossFn, phi: PyTree, batch: Batch) -> PyTree:
  """grad_phi l(z_i; phi) for every row: the tree of `phi` with a leading axis B on each leaf.

  Rows of invalid examples are exactly 0. Cost: ~3F, memory B x |phi| floats.
  """
  return per_example_losses_and_grads(loss_fn, phi, batch)[1]


def grad_norm(loss_fn: LossFn, phi: PyTree, batch: Batch) -> jax.Array:
  """||grad_phi l(z_i; phi)||_2 for every row, f32[B]; invalid rows 0. Cost: ~3F."""
  return jnp.sqrt(_batched_sq_norm(per_example_grads(loss_fn, phi, batch)))


def _safe_cos(dot: jax.Array, denom: jax.Array, eps: float) -> jax.Array:
  """dot / denom where denom > eps, else 0 (also 0 where dot is 0 because a norm is 0)."""
  ok = denom > eps
  return jnp.where(ok, dot / jnp.where(ok, denom, 1.0), 0.0).astype(jnp.float32)


def cosine(loss_fn: LossFn, phi0: PyTree, delta: PyTree, batch: Batch,
           *, eps: float = 1e-12) -> jax.Array:
  """s_i = -<g_i, delta> / (||g_i|| ||delta||), g_i = grad_phi l(z_i; phi0). Returns f32[B].

  Equals align / (||g_i|| ||delta||) (the numerator is taken from the per-example gradients,
  which are needed for the norms anyway). Removes the bias of `align` toward long / high-loss
  examples. Where ||g_i|| ||delta|| <= eps the score is 0; invalid rows score 0.
  Cost: ~3F, memory B x |phi| floats.
  """
  check_same_structure(phi0, delta)
  valid = _valid(batch)
  grads = per_example_grads(loss_fn, phi0, batch)
  dots = -_batched_dot(grads, delta)
  denom = jnp.sqrt(_batched_sq_norm(grads)) * tree_norm(delta)
  return _mask(valid, _safe_cos(dots, denom, eps))


def surrogate_fit(loss_fn: LossFn, phi_s: PyTree, batch: Batch) -> dict[str, jax.Array]:
  """The "validity" scores at the surrogate: {"neg_loss": -l(z_i; phi_s),
  "neg_grad_norm": -||grad_phi l(z_i; phi_s)||}, both f32[B], invalid rows 0.

  Keeps what the adaptation optimum already fits. Cost: ~3F (one vmapped value_and_grad gives
  both), memory B x |phi| floats.
  """
  valid = _valid(batch)
  losses, grads = per_example_losses_and_grads(loss_fn, phi_s, batch)
  return {"neg_loss": _mask(valid, -losses),
          "neg_grad_norm": _mask(valid, -jnp.sqrt(_batched_sq_norm(grads)))}


def grad_sum(loss_fn: LossFn, phi: PyTree, batch: Batch) -> tuple[PyTree, jax.Array]:
  """(sum over valid rows of grad_phi l(z_i; phi), number of valid rows as f32[]).

  For averaging over several batches: add the sums and counts, then `finish_mean`.
  Built from masked per-example gradients, so a NaN loss on a padding row cannot leak into the
  sum. Cost: ~3F, memory B x |phi| floats (the adaptation set is small).
  """
  valid = _valid(batch)
  grads = per_example_grads(loss_fn, phi, batch)
  return jax.tree.map(lambda g: jnp.sum(g, axis=0), grads), jnp.sum(valid.astype(jnp.float32))


def finish_mean(total: PyTree, count: jax.Array) -> PyTree:
  """total / max(count, 1): the mean gradient from `grad_sum` results summed over batches."""
  return jax.tree.map(lambda g: g / jnp.maximum(count, 1.0).astype(g.dtype), total)


def mean_grad(loss_fn: LossFn, phi: PyTree, batch: Batch) -> PyTree:
  """Mean of the valid per-example gradients of one batch (tree of `phi`). Cost: ~3F.

  For a set spread over several batches use `grad_sum` per batch and `finish_mean`.
  """
  return finish_mean(*grad_sum(loss_fn, phi, batch))


# ----------------------------------------------------------------------------- projection

# Names the definition of the Rademacher matrix below (fingerprinted by jbat.scoring.stream, so
# scores or features computed with an older definition are never mixed with new ones).
# flat-bits32-v3: the gradient tree is flattened into ONE vector (leaves concatenated in
# `jax.tree.leaves` order) and projected block by block; v2 drew separate blocks per leaf.
PROJECTION_VERSION = "flat-bits32-v3"
_WORD_BITS = 32


def _blocking(n: int, block: int) -> tuple[int, int]:
  """(rows per block, number of blocks) for a vector of n parameters: min(block, n), ceil."""
  if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
    raise JbatError(f"scoring.project: block must be a positive int, got {block!r}")
  rows = max(1, min(block, n))
  return rows, -(-max(n, 1) // rows)


def _check_dim(d: Any, where: str) -> None:
  if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
    raise JbatError(f"scoring.{where}: proj_dim must be a positive int (static under jit), got "
                    f"{d!r}")


def _n_params(tree_like: PyTree) -> int:
  """Number of entries of an un-batched tree (the length of its flattened vector)."""
  return sum(int(x.size) for x in jax.tree.leaves(tree_like))


def _block_words(key: jax.Array, block_index: jax.Array | int, rows: int, d: int) -> jax.Array:
  """uint32[rows, ceil(d/32)]: the random words of block `block_index` of the flat vector,
  `jax.random.bits(fold_in(key, block_index))`."""
  k = jax.random.fold_in(key, block_index)
  return jax.random.bits(k, (rows, -(-d // _WORD_BITS)), jnp.uint32)


def _unpack_signs(words: jax.Array, d: int) -> jax.Array:
  """uint32[..., w] -> f32[..., d]: column 32*t + k is +1/sqrt(d) if bit k of word t is 0,
  else -1/sqrt(d) (bit k = (word >> k) & 1), for k < 32 and the first d columns."""
  shifts = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
  bits = (words[..., None] >> shifts) & jnp.uint32(1)  # [..., w, 32]
  bits = bits.reshape(words.shape[:-1] + (-1,))[..., :d]
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  return jnp.where(bits == 0, scale, -scale).astype(jnp.float32)


def rademacher_words(key: jax.Array, tree_like: PyTree, d: int, *,
                     block: int = PROJ_BLOCK) -> jax.Array:
  """The packed projection matrix uint32[n_blocks, rows, ceil(d/32)], 32 signs a word.

  Block j is `_block_words(key, j, rows, d)` with rows = min(block, n), n_blocks =
  ceil(n / rows), n = the number of entries of `tree_like` (an un-batched tree such as phi,
  used only for its size); the signs are unpacked by bit (see `rademacher_projection`).
  Memory: about n x d / 8 bytes (9.4 MB for 73,728 parameters at d=1024), 32x less than the
  float matrix. Pass it as `words=` to `project` / `less` to skip the random-number
  generation (the words are what the RNG would produce).
  """
  _check_dim(d, "rademacher_words")
  rows, n_blocks = _blocking(_n_params(tree_like), block)
  return jax.vmap(lambda j: _block_words(key, j, rows, d))(jnp.arange(n_blocks))


def words_nbytes(tree_like: PyTree, d: int, *, block: int = PROJ_BLOCK) -> int:
  """Bytes that `rademacher_words(key, tree_like, d, block=block)` will occupy."""
  rows, n_blocks = _blocking(_n_params(tree_like), block)
  return n_blocks * rows * (-(-d // _WORD_BITS)) * 4


def rademacher_projection(key: jax.Array, tree_like: PyTree, d: int, *,
                          block: int = PROJ_BLOCK) -> PyTree:
  """The explicit projection matrix `project` uses, split by leaf: one f32[leaf.size, d] each.

  Concatenated in leaf order (`jax.tree.leaves`) they are the matrix R of the flattened
  vector. Entries are +-1/sqrt(d), i.i.d. fair signs, so E[<R^T u, R^T v>] = <u, v>. Row r of
  R lies in block j = r // rows (rows = min(block, n), n = the vector's length); its column c
  is the sign of bit c % 32 of word c // 32 of row r % rows of `jax.random.bits(fold_in(key,
  j), (rows, ceil(d/32)), uint32)`: 0 -> +1/sqrt(d), 1 -> -1/sqrt(d). `block` is part of the
  definition: change it and the matrix of vectors longer than `block` changes.
  Memory: n x d floats, so use this only for small trees and tests; `project` never holds
  more than one unpacked block.
  """
  words = rademacher_words(key, tree_like, d, block=block)
  full = _unpack_signs(words, d).reshape(-1, d)
  leaves, treedef = jax.tree.flatten(tree_like)
  out, start = [], 0
  for x in leaves:
    out.append(full[start:start + int(x.size)])
    start += int(x.size)
  return jax.tree.unflatten(treedef, out)


def flatten_batched(grads_tree: PyTree) -> jax.Array:
  """f32[B, n]: every leaf (leading axis B) flattened per row and concatenated in leaf order."""
  leaves = jax.tree.leaves(grads_tree)
  if not leaves:
    raise JbatError("scoring.project: the gradient tree has no leaves")
  b = leaves[0].shape[0]
  return jnp.concatenate([g.astype(jnp.float32).reshape(b, -1) for g in leaves], axis=1)


def project_flat(flat: jax.Array, key: jax.Array | None, d: int, *, block: int = PROJ_BLOCK,
                 words: jax.Array | None = None) -> jax.Array:
  """R^T of each row of f32[B, n] (the matrix of `rademacher_projection`), f32[B, d].

  One `lax.fori_loop` over blocks of `block` rows (so compile time does not grow with the
  number of leaves), regenerating each block's signs from `key`, or unpacking them from
  `words` (from `rademacher_words`). Memory: one unpacked rows x d block plus B x d.
  """
  _check_dim(d, "project")
  if words is None and key is None:
    raise JbatError("scoring.project: pass a PRNG key or the packed matrix (words=...)")
  b, n = flat.shape
  rows, n_blocks = _blocking(n, block)
  if words is not None:
    want = (n_blocks, rows, -(-d // _WORD_BITS))
    if tuple(words.shape) != want or words.dtype != jnp.uint32:
      raise JbatError(f"scoring.project: words is {words.dtype}{list(words.shape)}, expected "
                      f"uint32{list(want)} for {n} parameters, d={d}, block={block}; build it "
                      f"with rademacher_words(key, phi, d, block=block)")
  hi = jax.lax.Precision.HIGHEST

  def signs(j):
    if words is None:
      return _unpack_signs(_block_words(key, j, rows, d), d)
    return _unpack_signs(jax.lax.dynamic_index_in_dim(words, j, keepdims=False), d)

  flat = flat.astype(jnp.float32)
  if n_blocks == 1:
    return jnp.dot(flat, signs(0)[:n], precision=hi)
  flat = jnp.pad(flat, ((0, 0), (0, n_blocks * rows - n))).reshape(b, n_blocks, rows)

  def body(j, acc):
    chunk = jax.lax.dynamic_index_in_dim(flat, j, axis=1, keepdims=False)
    return acc + jnp.dot(chunk, signs(j), precision=hi)

  return jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((b, d), jnp.float32))


def project(grads_tree: PyTree, key: jax.Array | None, d: int, *, block: int = PROJ_BLOCK,
            words: jax.Array | None = None) -> jax.Array:
  """Seeded Rademacher projection of flattened per-example gradients to d dims. f32[B, d].

  `grads_tree` has a leading axis B on every leaf; its rows are flattened into one vector each
  (`flatten_batched`) and multiplied by R = the concatenation of `rademacher_projection(key, .,
  d, block=block)`: inner products are preserved in expectation (Johnson-Lindenstrauss; the
  error of <Pu, Pv> has standard deviation about ||u|| ||v|| sqrt(2/d)). Use the same key for
  every vector compared. The signs come 32 per random uint32 word. With `words` (from
  `rademacher_words(key, phi, d, block=block)`, e.g. made once per run) no random numbers are
  drawn and `key` may be None; the result is the same.
  Memory: the flat B x |phi| copy, one unpacked block x d matrix at a time inside a
  `lax.fori_loop` plus B x d accumulators; compute B x |phi| x d multiply-adds.
  """
  _check_dim(d, "project")
  return project_flat(flatten_batched(grads_tree), key, d, block=block, words=words)


def project_target(target_grad: PyTree, key: jax.Array | None, d: int, *,
                   block: int = PROJ_BLOCK, words: jax.Array | None = None) -> jax.Array:
  """P^T flat(target_grad) for ONE un-batched tree (e.g. the mean adaptation gradient). f32[d].

  The same projection as `project` (same key, d, block): compute it once and pass it to `less`
  as its target when projecting, instead of re-projecting the target for every batch.
  """
  return project(jax.tree.map(lambda x: x[None], target_grad), key, d, block=block,
                 words=words)[0]


def less(loss_fn: LossFn, phi_s: PyTree, target: PyTree | jax.Array, batch: Batch, *,
         key: jax.Array | None = None, proj_dim: int | None = None,
         words: jax.Array | None = None, eps: float = 1e-12) -> jax.Array:
  """LESS anchor: cos(grad_phi l(z_i; phi_s), target direction), f32[B], invalid rows 0.

  Exact (proj_dim None): `target` is the mean adaptation-set gradient at phi_s (a tree like
  phi_s, from `mean_grad` / `grad_sum`) and s_i = <g_i, t> / (||g_i|| ||t||).
  Projected (proj_dim = d, static under jit), as in LESS: `target` is the already projected
  target f32[d] = `project_target(target_grad, key, d)`, computed once per run, and
  s_i = <P^T g_i, target> / (||P^T g_i|| ||target||) with P^T g_i = `project(g, key, d)`.
  Pass the same `key` used for the target, or `words = rademacher_words(key, phi_s, d)` (made
  once; then no random numbers are drawn per call and `key` may be None).
  Zero norms give 0. Cost: ~3F, memory B x |phi|, plus B x |phi| x d multiply-adds when
  projecting (and drawing |phi| x d / 32 random words per call unless `words` is given).
  """
  if proj_dim is None:
    if key is not None or words is not None:
      raise JbatError("scoring.less: key / words are only used with proj_dim (the projected "
                      "cosine); set proj_dim or drop them")
    check_same_structure(phi_s, target, name="target_grad", reference_name="phi_s")
  else:
    _check_dim(proj_dim, "less")
    if key is None and words is None:
      raise JbatError("scoring.less: proj_dim is set, so a PRNG key (key=...) or the packed "
                      "matrix (words=rademacher_words(key, phi_s, proj_dim)) is required")
    if not isinstance(target, (jax.Array, np.ndarray)) or tuple(target.shape) != (proj_dim,):
      got = (f"{target.dtype}{list(target.shape)}" if hasattr(target, "shape")
             else type(target).__name__)
      raise JbatError(f"scoring.less: with proj_dim={proj_dim} the target must be the projected "
                      f"target f32[{proj_dim}] = project_target(target_grad, key, {proj_dim}), "
                      f"got {got}")
  valid = _valid(batch)
  grads = per_example_grads(loss_fn, phi_s, batch)
  if proj_dim is None:
    dots = _batched_dot(grads, target)
    denom = jnp.sqrt(_batched_sq_norm(grads)) * tree_norm(target)
  else:
    pg = project(grads, key, proj_dim, words=words)
    pt = jnp.asarray(target, jnp.float32)
    dots = jnp.dot(pg, pt, precision=jax.lax.Precision.HIGHEST)
    denom = jnp.linalg.norm(pg, axis=1) * jnp.linalg.norm(pt)
  return _mask(valid, _safe_cos(dots, denom, eps))


# ----------------------------------------------------------------------------- random anchor


def random_scores(key: jax.Array, ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Uniform [0, 1) score per example id: u(fold_in(key, id)). f32[B].

  Depends only on (key, id), never on batch composition, order or device count. `ids` is an
  integer [B] (folded in as uint32, so ids are taken modulo 2**32 when jax x64 is off), or
  [B, 2] (high, low) 32-bit words for 64-bit ids. Rows with valid False (if given) score 0.
  Cost: no model forward.
  """
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim not in (1, 2) or (
      ids.ndim == 2 and ids.shape[1] != 2):
    raise JbatError(f"scoring.random_scores: ids must be integer [B] or [B, 2] (hi, lo), got "
                    f"{ids.dtype}{list(ids.shape)}")
  words = ids.astype(jnp.uint32).reshape(ids.shape[0], -1)

  def one(w):
    k = key
    for t in range(words.shape[1]):
      k = jax.random.fold_in(k, w[t])
    return jax.random.uniform(k, (), jnp.float32)

  out = jax.vmap(one)(words)
  return out if valid is None else _mask(jnp.asarray(valid).astype(bool), out)


def jit_kernel(kernel: Callable[..., Any], loss_fn: LossFn, **static: Any) -> Callable[..., Any]:
  """jax.jit of `kernel` with `loss_fn` (and keyword arguments such as proj_dim) bound.

  Example: `score = jit_kernel(align, loss_fn); s = score(phi0, delta, batch)`.
  """
  return jax.jit(functools.partial(kernel, loss_fn, **static))
