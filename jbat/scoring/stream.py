"""ALBAT stage 2 at scale: stream the backbone pool through the jitted kernels, resumably.

The pool is read in order in fixed-shape padded batches made by the model's batch maker
(`jbat.scorable.Scorable`: for the LM B rows of L tokens, for the denoiser B images with their
seeded timesteps and noise; a `valid` mask on padding rows). Each batch is split over the
mesh's `data` axis (NamedSharding, `loop.shard_batch`) while the adapters and the frozen
backbone are replicated;
each score has its own jitted kernel, compiled once for the batch shape. Scores are written in
chunks of `chunk_batches` batches:

  out_dir/chunk_000000.npz   ids int64[n], one float32[n] array per score name (pool order)
  out_dir/cursor.json        {"next_chunk", "n_chunks", "fingerprint", ...}

Each chunk is written atomically and the cursor after it, so a run killed at any moment (even
SIGKILL) continues at `next_chunk` when called again with the same arguments and produces the
same files. The fingerprint hashes everything that determines the scores (score names, batch
shape, chunking, pool contents, adapters); a mismatch is an error rather than a silent mix.

Memory: for a pool given as a list, its token arrays are in memory; activations and
per-example gradients exist for one batch at a time, and a chunk holds `chunk_batches * B`
floats per score.

A pool given as files (`jbat.data.pool_stream.FilePool`, the user's data.pool) is streamed
instead: each process reads and tokenizes only its share of the files / rows, a chunk at a
time, and feeds its rows of every global batch (padding rows once its share is done; the
stream ends after the first batch no process filled). The chunk files then also hold each
row's location and text hash (meta_file, meta_row, meta_hash; `ScoreTable.meta`), the
fingerprint names the files (path, size, mtime), the encoding and the process layout, and the
final cursor records what the pass read and left out ("pool_counts", summed over processes).
Rows land in the chunks in an order that depends on the number of processes, so a streamed
table is merged by id (`ScoreTable.sorted_by_id`) before selection. Nothing holds the
tokenized pool: memory is one chunk of records plus the score table (~40 bytes per row).

Score names (docs/method.md, "Scores"; every score is "higher = select first"):
  align           -<grad l(z; phi0), delta>                  (one jvp, ~2F)
  loss_diff       l(z; phi0) - l(z; phi_s)                   (~2F)
  cosine          align / (||grad l(z; phi0)|| ||delta||)     (vmap grads, ~3F)
  surrogate_fit   -l(z; phi_s)                               (vmap grads, ~3F)
  surrogate_grad  -||grad l(z; phi_s)||                      (shares surrogate_fit's kernel)
  less            LESS as its authors run it (jbat.scoring.less_warmup): warm-up LoRA
                  checkpoints on 5% of the pool, Adam-preconditioned projected gradients,
                  lr-weighted cosines, max over D_A (~3F per checkpoint plus the warm-up)
  less_1ckpt      cos(grad l(z; phi_s), mean D_A grad at phi_s), optional Rademacher projection
  rel_loss_diff   (l(z; phi0) - l(z; phi_s)) / l(z; phi0)    (~2F; 0 where l(z; phi0) <= 0)
  contrast        l(z; phi_c) - l(z; phi_s)                  (~2F; needs a control surrogate)
  contrast_align  -<grad l(z; phi0), phi_s - phi_c>          (one jvp, ~2F; control surrogate)
  dsir            DSIR (jbat.scoring.dsir): hashed uni+bigram log importance weight of D_A vs
                  the pool plus seeded Gumbel noise per id (topk = DSIR's resampling; host)
  random          uniform [0, 1) from (seed, example id)

All losses are the model's per-example loss (`Batches.model`'s, via
`surrogate.per_example_loss_fn`; for the LM per-token means). phi_c is the trained adapter
of a *control* surrogate (`control=`): same spec, seed and init as the surrogate, trained on
|D_A| random pool documents, so `contrast` is Moore & Lewis's cross-entropy difference in
adapter space and `contrast_align` its first-order form.

`pool_grad_features` streams the same way and returns seeded Rademacher projections of the
per-example gradients at phi_s (f32[N, d]): the features of the `cluster` and `round_robin`
selection rules (jbat.selection).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jbat import distributed, io, registry
from jbat import scorable as scorable_lib
from jbat.data import pool_stream
from jbat.errors import JbatError
from jbat.scoring import dsir as dsir_lib
from jbat.scoring import kernels
from jbat.scoring import less_warmup as less_lib
from jbat import surrogate as surrogate_lib
from jbat.training import loop

# The names live in jbat.registry; these aliases keep `stream.SCORE_NAMES` etc. working.
SCORE_NAMES = registry.SCORES
MODEL_SCORES = registry.MODEL_SCORES
CONTROL_SCORES = registry.CONTROL_SCORES
CURSOR_FILE = "cursor.json"
# Largest packed Rademacher matrix (|phi| x d / 8 bytes) that is made once and kept on device.
MAX_PROJECTION_WORDS_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Batches:
  """How a stream walks its examples: global batches of `batch_size` rows (a multiple of the
  mesh's `data` axis), `chunk_batches` batches per chunk file and resume point, made by
  `model` (a jbat.scorable.Scorable: batch maker, per-example loss, example hasher). Without
  `model` the examples are the causal LM's, padded to `max_len` tokens with `pad_id`
  (scorable.lm)."""

  batch_size: int
  max_len: int = 0
  pad_id: int = 0
  chunk_batches: int = 64
  model: scorable_lib.Scorable | None = None

  def scorable(self) -> scorable_lib.Scorable:
    return self.model if self.model is not None else scorable_lib.lm(self.max_len, self.pad_id)


@dataclasses.dataclass(frozen=True)
class ScoreTable:
  """ids int64[N] (pool order) and one float32[N] array per score name; for a streamed file
  pool (`score_pool` of a `FilePool`) also `meta`: int64[N] "file" (index into the pool's
  files), "row" and "hash" (text hash) per example."""

  ids: np.ndarray
  scores: dict[str, np.ndarray]
  meta: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def sorted_by_id(self) -> "ScoreTable":
    """The table with its rows in increasing id order, one row per id (of rows with one id,
    the first by file and row when the table has locations): the same table however the pool
    was sharded over processes (merge by id)."""
    keys = [self.meta[k] for k in ("row", "file") if k in self.meta]
    order = np.lexsort((*keys, self.ids))
    ids = self.ids[order]
    order = order[np.concatenate([[True], ids[1:] != ids[:-1]])] if len(ids) else order
    return ScoreTable(ids=self.ids[order], scores={k: v[order] for k, v in self.scores.items()},
                      meta={k: v[order] for k, v in self.meta.items()})

  def __len__(self) -> int:
    return int(self.ids.shape[0])


def chunk_path(out_dir: pathlib.Path, index: int) -> pathlib.Path:
  return pathlib.Path(out_dir) / f"chunk_{index:06d}.npz"


# ----------------------------------------------------------------------------- bookkeeping


def _fingerprint(scores: Sequence[str], surrogate: surrogate_lib.Surrogate | None,
                 pool_examples: Sequence[dict[str, Any]], settings: dict[str, Any],
                 pool_texts: Sequence[str] | None, adapt_texts: Sequence[str] | None,
                 control_phi: Any = None, *, model: scorable_lib.Scorable) -> str:
  """sha256 (first 16 hex) of everything that determines the chunk files: `settings` and the
  batch maker's (model.settings), the examples (model.hash_examples), the adapters."""
  settings = {**settings, **model.settings}
  h = hashlib.sha256(json.dumps({"scores": list(scores), **settings}, sort_keys=True).encode())
  model.hash_examples(h, pool_examples)
  trees = () if surrogate is None else (surrogate.phi0, surrogate.phi_s)
  if control_phi is not None:
    trees += (control_phi,)
  for tree in trees:
    io.hash_tree(h, tree)
  for texts in (pool_texts, adapt_texts):
    for t in texts or ():
      h.update(t.encode("utf-8", errors="replace") + b"\x01")
  return h.hexdigest()[:16]


def _examples_digest(examples: Sequence[dict[str, Any]], model: scorable_lib.Scorable) -> str:
  """sha256 (first 16 hex) of the examples' contents (model.hash_examples), in order."""
  h = hashlib.sha256()
  model.hash_examples(h, examples)
  return h.hexdigest()[:16]


def _read_cursor(out_dir: pathlib.Path, fingerprint: str, n_chunks: int | None) -> int | None:
  """Index of the next chunk to compute (0 when starting fresh). n_chunks None (a streamed
  pool, whose chunk count is known only at its end): None when the cursor says done."""
  path = out_dir / CURSOR_FILE
  if not path.exists():
    return 0
  try:
    cursor = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise JbatError(f"{path}: not valid JSON ({e.msg}); delete it to rescore from the start")
  if cursor.get("fingerprint") != fingerprint:
    raise JbatError(f"{path}: these scores were computed with other inputs (fingerprint "
                    f"{cursor.get('fingerprint')!r}, now {fingerprint!r}: different pool, "
                    f"adapters, scores or batch settings); use a fresh output folder")
  next_chunk = int(cursor.get("next_chunk", 0))
  if n_chunks is None:
    return None if cursor.get("done") else next_chunk
  if not 0 <= next_chunk <= n_chunks:
    raise JbatError(f"{path}: next_chunk {next_chunk} is outside 0..{n_chunks}")
  return next_chunk


def _write_cursor(out_dir: pathlib.Path, fingerprint: str, next_chunk: int,
                  n_chunks: int | None, n_examples: int, extra: dict | None = None) -> None:
  # Two runs may fill one cache folder at once (same inputs: the same chunks): the cursor only
  # moves forward, so a run that finished is never told by the other that it did not.
  with io.file_lock(out_dir / ".cursor.lock"):
    try:
      old = json.loads((out_dir / CURSOR_FILE).read_text())
      if old.get("fingerprint") == fingerprint and int(old.get("next_chunk", 0)) >= next_chunk:
        return
    except (OSError, ValueError):
      pass
    io.write_json_atomic(out_dir / CURSOR_FILE, {
        "fingerprint": fingerprint, "next_chunk": next_chunk, "n_chunks": n_chunks,
        "n_examples": n_examples, "done": n_chunks is not None and next_chunk == n_chunks,
        **(extra or {})})


def scores_dir(out_dir: str | pathlib.Path) -> pathlib.Path:
  """Where the chunks of a score_pool out_dir live: the shared cache folder its source.json
  names (score_pool with cache_dir), else out_dir itself."""
  out_dir = pathlib.Path(out_dir)
  source = out_dir / "source.json"
  return pathlib.Path(json.loads(source.read_text())["scores"]) if source.exists() else out_dir


def load_table(out_dir: str | pathlib.Path, scores: Sequence[str] | None = None) -> ScoreTable:
  """Concatenates the finished chunks of `out_dir` (in chunk order) into a ScoreTable.

  Raises JbatError if the cursor says the scoring is not finished.
  """
  out_dir = pathlib.Path(out_dir)
  path = out_dir / CURSOR_FILE
  cursor = json.loads(path.read_text()) if path.exists() else {}
  if not cursor.get("done"):
    raise JbatError(f"{out_dir}: scoring is not finished (cursor {cursor or 'missing'}); run "
                    f"score_pool again to continue it")
  ids, cols, meta = [], {}, {}
  for i in range(int(cursor["n_chunks"])):
    with np.load(chunk_path(out_dir, i)) as z:
      ids.append(z["ids"])
      for key in z.files:
        if key.startswith("score_") and (scores is None or key[6:] in scores):
          cols.setdefault(key[6:], []).append(z[key])
        elif key.startswith("meta_"):
          meta.setdefault(key[5:], []).append(z[key])
  return ScoreTable(ids=np.concatenate(ids).astype(np.int64),
                    scores={k: np.concatenate(v).astype(np.float32) for k, v in cols.items()},
                    meta={k: np.concatenate(v).astype(np.int64) for k, v in meta.items()})


# ----------------------------------------------------------------------------- kernels


def _id_words(ids: np.ndarray) -> np.ndarray:
  """int64[B] -> uint32[B, 2] (high, low) words, so 64-bit ids reach `random_scores` intact."""
  u = ids.astype(np.int64).view(np.uint64)
  return np.stack([(u >> np.uint64(32)), u & np.uint64(0xFFFFFFFF)], axis=1).astype(np.uint32)


def _make_model_kernels(names: Sequence[str], surrogate: surrogate_lib.Surrogate,
                        less_proj_dim: int | None, model_loss) -> dict[str, Any]:
  """One jitted function per kernel: (params, batch) -> {score name: f32[B]}.

  `params` = {"rest", "phi0", "phi_s", "delta", "target", "key", "words", "phi_c", "delta_c"}
  are passed as arguments (not baked in as constants), so the compiled programs do not grow
  with the model. With `less_proj_dim`, "target" is the projected target f32[d] and "words"
  (when present) the packed projection matrix, both made once per run (`_less_projection`).
  rel_loss_diff and contrast share one kernel, so l(z; phi_s) is computed once.
  """
  graphdef = surrogate.graphdef

  def loss(params):
    return surrogate_lib.per_example_loss_fn(graphdef, params["rest"], model_loss)

  fns = {
      "align": lambda p, b: {"align": kernels.align(loss(p), p["phi0"], p["delta"], b)},
      "loss_diff": lambda p, b: {"loss_diff": kernels.loss_diff(loss(p), p["phi0"], p["phi_s"],
                                                                b)},
      "cosine": lambda p, b: {"cosine": kernels.cosine(loss(p), p["phi0"], p["delta"], b)},
      "less_1ckpt": lambda p, b: {"less_1ckpt": kernels.less(
          loss(p), p["phi_s"], p["target"], b, proj_dim=less_proj_dim,
          **({} if less_proj_dim is None else {"key": p["key"], "words": p.get("words")}))},
  }

  def fit(p, b):
    out = kernels.surrogate_fit(loss(p), p["phi_s"], b)
    return {"surrogate_fit": out["neg_loss"], "surrogate_grad": out["neg_grad_norm"]}

  rel_contrast = [n for n in ("rel_loss_diff", "contrast") if n in names]

  def losses_vs(p, b):
    valid = b["valid"]
    ls = loss(p)(p["phi_s"], b).astype(jnp.float32)
    out = {}
    if "rel_loss_diff" in rel_contrast:
      l0 = loss(p)(p["phi0"], b).astype(jnp.float32)
      out["rel_loss_diff"] = kernels.relative_diff(l0, ls, valid)
    if "contrast" in rel_contrast:
      lc = loss(p)(p["phi_c"], b).astype(jnp.float32)
      out["contrast"] = jnp.where(valid, lc - ls, 0.0)
    return out

  fns["contrast_align"] = lambda p, b: {
      "contrast_align": kernels.align(loss(p), p["phi0"], p["delta_c"], b)}

  kernels_by_name = {}
  if rel_contrast:
    kernels_by_name["rel_contrast"] = losses_vs
  if {"surrogate_fit", "surrogate_grad"} & set(names):
    kernels_by_name["surrogate_fit"] = fit
  for name in names:
    if name in fns:
      kernels_by_name[name] = fns[name]
  return {name: jax.jit(fn) for name, fn in kernels_by_name.items()}


def _mean_adapt_grad(surrogate: surrogate_lib.Surrogate,
                     adapt_examples: Sequence[dict[str, Any]], batch_size: int,
                     model: scorable_lib.Scorable, mesh: jax.sharding.Mesh, rest: Any,
                     phi_s: Any) -> Any:
  """Mean per-example gradient at phi_s over the adaptation set (LESS target direction)."""
  graphdef = surrogate.graphdef

  @jax.jit
  def step(rest, phi_s, batch):
    return kernels.grad_sum(surrogate_lib.per_example_loss_fn(graphdef, rest, model.loss),
                            phi_s, batch)

  total, count = None, 0.0
  for _, _, dev in global_batches(adapt_examples, batch_size, model, mesh):
    s, c = step(rest, phi_s, dev)
    s = jax.tree.map(distributed.host_array, s)
    total = s if total is None else jax.tree.map(np.add, total, s)
    count += float(distributed.host_array(c))
  return kernels.finish_mean(total, np.float32(count))


def _less_warmup_kernel(surrogate: surrogate_lib.Surrogate,
                        pool_examples: Sequence[dict[str, Any]],
                        adapt_examples: Sequence[dict[str, Any]], spec: less_lib.LessWarmup,
                        batch_size: int, model: scorable_lib.Scorable, mesh: jax.sharding.Mesh,
                        params: dict[str, Any], seed: int, progress: bool):
  """LESS (jbat.scoring.less_warmup): the warm-up on a seeded `spec.fraction` of the pool
  (reshuffled every epoch), the adaptation features at each checkpoint, and the jitted
  (params, batch) -> {"less": f32[B]} of the pool pass. Runs once per scoring run."""
  graphdef = surrogate.graphdef
  loss = lambda rest: surrogate_lib.per_example_loss_fn(graphdef, rest, model.loss)
  rest = params["rest"]
  batch_size = spec.batch_size or batch_size  # The warm-up's batch (the pool pass keeps its own).
  if hasattr(pool_examples, "local_examples"):  # A file pool: a seeded uniform draw from it.
    n_rows = int(sum(pool_examples.row_counts()))
    count = min(n_rows, max(batch_size, int(round(float(spec.fraction) * n_rows))))
    subset = pool_examples.sample(count, int(np.random.SeedSequence([int(seed), 0x1E55])
                                              .generate_state(1)[0]))
  else:
    picks = less_lib.warmup_indices(len(pool_examples), spec.fraction, seed,
                                    min_count=batch_size)
    subset = [pool_examples[i] for i in picks]

  def epoch_batches(epoch):
    order = np.random.default_rng([int(seed), 0x1E55, epoch]).permutation(len(subset))
    for _, _, dev in global_batches([subset[i] for i in order], batch_size, model, mesh):
      yield dev

  t0 = time.perf_counter()
  ckpts = less_lib.warmup_train(loss, rest, params["phi0"], epoch_batches,
                                -(-len(subset) // batch_size), spec)
  stacked = loop.replicate(less_lib.stack_checkpoints(ckpts), mesh)
  key = jax.random.key(seed)
  words = _projection_words(params["phi0"], key, spec.proj_dim, mesh)
  feats_fn = jax.jit(lambda r, st, b, w: less_lib.adapt_features(loss(r), st, b, key, spec, w))
  feats, valid = [], []
  for _, ok, dev in global_batches(adapt_examples, batch_size, model, mesh):
    feats.append(distributed.host_array(feats_fn(rest, stacked, dev, words)))
    valid.append(ok)
  params["less"] = loop.replicate({"stacked": stacked,
                                   "adapt": jnp.asarray(np.concatenate(feats, axis=1)),
                                   "adapt_valid": jnp.asarray(np.concatenate(valid))}, mesh)
  params["less"]["words"] = words  # Replicated already (None: regenerated per batch).
  if progress and distributed.is_main():
    print(f"less: warm-up on {len(subset)} pool examples, {spec.epochs} checkpoints, "
          f"{len(adapt_examples)} adaptation features in {time.perf_counter() - t0:.1f} s",
          flush=True)
  return jax.jit(lambda p, b: {"less": less_lib.score_batch(
      loss(p["rest"]), p["less"]["stacked"], p["less"]["adapt"], p["less"]["adapt_valid"], b,
      key, spec, p["less"]["words"])})


def _projection_words(phi_s: Any, key: jax.Array, proj_dim: int,
                      mesh: jax.sharding.Mesh) -> Any:
  """`kernels.rademacher_words(key, phi_s, proj_dim)` replicated on the mesh, or None when it
  would take MAX_PROJECTION_WORDS_BYTES or more (then kernels regenerate it from the key)."""
  if kernels.words_nbytes(phi_s, proj_dim) >= MAX_PROJECTION_WORDS_BYTES:
    return None
  return loop.replicate(jax.jit(kernels.rademacher_words, static_argnums=2)(
      key, phi_s, proj_dim), mesh)


def _less_projection(phi_s: Any, target_grad: Any, key: jax.Array, proj_dim: int,
                     mesh: jax.sharding.Mesh) -> tuple[jax.Array, Any]:
  """(projected target f32[d], packed matrix or None), computed once per run for `less`.

  The packed matrix (`kernels.rademacher_words`, |phi| x d / 8 bytes) is materialised and
  replicated when it is under MAX_PROJECTION_WORDS_BYTES; the kernel then draws no random
  numbers per batch. Otherwise (None) each batch regenerates it block by block from the key.
  Both give the same scores.
  """
  words = _projection_words(phi_s, key, proj_dim, mesh)
  target = jax.jit(kernels.project_target, static_argnums=2)(target_grad, key, proj_dim,
                                                             words=words)
  return loop.replicate(target, mesh), words


def _put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
               keys: Sequence[str]) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays split over `data`: the model
  inputs `keys` (loop.shard_batch), the valid mask and the id words."""
  out = loop.shard_batch(batch, mesh, keys)
  sharding = NamedSharding(mesh, P("data"))
  out["valid"] = jax.make_array_from_process_local_data(sharding, np.asarray(batch["valid"]))
  out["id_words"] = jax.make_array_from_process_local_data(sharding, _id_words(batch["id"]))
  return out


def global_batches(examples: Sequence[dict[str, Any]], batch_size: int,
                   model: scorable_lib.Scorable, mesh: jax.sharding.Mesh):
  """One ordered pass over `examples` in global batches of `batch_size` rows (the last one
  padded): yields (ids int64[B], valid bool[B], device batch). Every process walks the same
  batches, but makes (model.make_batch) and feeds only its own rows
  (`distributed.local_rows`)."""
  rows = distributed.local_rows(batch_size, mesh)
  for lo in range(0, len(examples), batch_size):
    part = list(examples[lo:lo + batch_size])
    ids = np.full(batch_size, -1, np.int64)
    ids[:len(part)] = [ex["id"] for ex in part]
    valid = np.arange(batch_size) < len(part)
    local = model.make_batch(part[rows], rows.stop - rows.start)
    yield ids, valid, _put_batch(local, mesh, model.batch_keys)


def _stream_chunks(examples: Sequence[dict[str, Any]], out_dir: pathlib.Path, fingerprint: str,
                   compute, *, batch_size: int, model: scorable_lib.Scorable,
                   mesh: jax.sharding.Mesh, chunk_batches: int, desc: str, progress: bool,
                   finish_chunk=None, check=None) -> None:
  """The resumable chunk loop shared by `score_pool` and `pool_grad_features`.

  From the cursor on, every chunk of `chunk_batches` global batches is computed by
  `compute(device batch) -> {name: array [B, ...]}` (gathered to every process), restricted to
  the valid rows, completed by `finish_chunk(lo, hi, ids, columns) -> columns` (host-side
  scores), checked by `check(ids, columns)` (raises), and written by process 0: the chunk file
  (atomically), then the cursor. Ends with a barrier, so every process can read all chunks.
  """
  n = len(examples)
  chunk_size = chunk_batches * batch_size
  n_chunks = -(-n // chunk_size)
  start = _read_cursor(out_dir, fingerprint, n_chunks)
  bar = tqdm(total=n, initial=min(start * chunk_size, n), desc=desc, unit="ex",
             disable=not progress or not distributed.is_main(), dynamic_ncols=True)
  t0, done = time.perf_counter(), 0
  for c in range(start, n_chunks):
    lo, hi = c * chunk_size, min((c + 1) * chunk_size, n)
    ids, cols = [], {}
    for batch_ids, valid, dev in global_batches(examples[lo:hi], batch_size, model, mesh):
      for name, value in compute(dev).items():
        cols.setdefault(name, []).append(distributed.host_array(value)[valid])
      ids.append(batch_ids[valid])
      bar.update(int(valid.sum()))
    chunk_ids = np.concatenate(ids).astype(np.int64)
    chunk = {k: np.concatenate(v) for k, v in cols.items()}
    if finish_chunk is not None:
      chunk = finish_chunk(lo, hi, chunk_ids, chunk)
    if check is not None:
      check(chunk_ids, chunk)
    if distributed.is_main():
      with io.atomic_path(chunk_path(out_dir, c)) as tmp:
        with open(tmp, "wb") as f:  # A file object: np.savez would otherwise append ".npz".
          np.savez(f, ids=chunk_ids, **chunk)
      _write_cursor(out_dir, fingerprint, c + 1, n_chunks, n)
    done += hi - lo
    bar.set_postfix(ex_s=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}")
  bar.close()
  distributed.barrier(f"jbat-stream-{fingerprint}")


# ----------------------------------------------------------------------------- file pools


def _local_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  rows = distributed.local_rows(batch_size, mesh)
  return rows.stop - rows.start


def _all_sum(x: np.ndarray) -> np.ndarray:
  """The sum of `x` over processes (every process gets it)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def _stream_ngram_model(pool, mesh) -> np.ndarray:
  """dsir's pool n-gram model of a streamed pool: each process counts its share's n-grams,
  the counts are summed over processes (one pass over the pool, one example at a time)."""
  del mesh
  n_buckets = 2**16
  counts = np.zeros(n_buckets, np.float64)
  for ex in pool.local_examples(jax.process_index(), jax.process_count()):
    counts += np.bincount(dsir_lib.hash_ngrams(ex["text"], n_buckets), minlength=n_buckets)
  counts = _all_sum(counts)
  return np.log(counts + 1.0) - np.log(counts.sum() + n_buckets)


_META = ("file", "row", "hash")


def _words(values: np.ndarray) -> np.ndarray:
  """int64[n] -> uint32[n, 2] (high, low)."""
  u = np.asarray(values, np.int64).view(np.uint64)
  return np.stack([u >> np.uint64(32), u & np.uint64(0xFFFFFFFF)], axis=1).astype(np.uint32)


def _unwords(w: np.ndarray) -> np.ndarray:
  return ((w[:, 0].astype(np.uint64) << np.uint64(32)) | w[:, 1].astype(np.uint64)).view(np.int64)


def _gather_local(local: np.ndarray, mesh: jax.sharding.Mesh) -> np.ndarray:
  """This process's rows of a [B, ...] host array -> the whole [B, ...] on every process."""
  sharding = NamedSharding(mesh, P("data"))
  return distributed.host_array(jax.make_array_from_process_local_data(sharding, local))


def _stream_file_chunks(pool, out_dir: pathlib.Path, fingerprint: str, compute, *,
                        batch_size: int, model: scorable_lib.Scorable, mesh: jax.sharding.Mesh,
                        chunk_batches: int, desc: str, progress: bool, local_columns=None,
                        check=None) -> None:
  """The resumable chunk loop of a streamed file pool (`FilePool`): each process feeds its
  rows of every global batch from its own share (`pool.local_examples(process, processes)`,
  tokenized on the fly); a process whose share is done feeds padding rows. After each batch
  the ids, locations and text hashes of all rows are gathered with the scores; the stream
  ends after the first batch in which no process filled its rows. Chunk c holds global
  batches [c * chunk_batches, (c + 1) * chunk_batches): per process the usable examples
  [c * chunk_batches * b, ...) of its share (b = its rows per batch), so a resumed run skips
  exactly those (reading and tokenizing them again, not scoring them) and writes the same
  chunks. `local_columns(part) -> {name: float32[len(part)]}` adds host-computed columns (dsir).
  """
  proc, n_proc = jax.process_index(), jax.process_count()
  local_b = _local_size(batch_size, mesh)
  start = _read_cursor(out_dir, fingerprint, None) or 0
  counts = pool_stream.PoolCounts()
  stream = pool.local_examples(proc, n_proc, counts)
  skip = start * chunk_batches * local_b
  for _ in zip(range(skip), stream):
    pass
  bar = tqdm(desc=desc, unit="ex", disable=not progress or not distributed.is_main(),
             dynamic_ncols=True)
  t0, done, c, finished = time.perf_counter(), 0, start, False
  while not finished:
    ids, cols, meta = [], {}, {k: [] for k in _META}
    for _ in range(chunk_batches):
      part = [ex for _, ex in zip(range(local_b), stream)]
      local = model.make_batch(part, local_b)
      words = np.zeros((local_b, 8), np.uint32)
      if part:
        words[:len(part), 0:2] = _words([ex["id"] for ex in part])
        words[:len(part), 2] = [ex["file"] for ex in part]
        words[:len(part), 3:5] = _words([ex["row"] for ex in part])
        words[:len(part), 5:7] = _words([ex["hash"] for ex in part])
      words[:len(part), 7] = 1  # valid
      full = np.full((local_b,), len(part) == local_b, np.uint8)
      extra = {}
      for name, v in (local_columns(part) if local_columns is not None else {}).items():
        extra[name] = np.zeros(local_b, np.float32)
        extra[name][:len(part)] = v
      dev = _put_batch(local, mesh, model.batch_keys)
      out = {name: distributed.host_array(v) for name, v in compute(dev).items()}
      g = _gather_local(words, mesh)
      g_full = _gather_local(full, mesh)
      valid = g[:, 7].astype(bool)
      for name, v in extra.items():
        out[name] = _gather_local(v, mesh)
      for name, v in out.items():
        cols.setdefault(name, []).append(v[valid])
      ids.append(_unwords(g[valid, 0:2]))
      meta["file"].append(g[valid, 2].astype(np.int64))
      meta["row"].append(_unwords(g[valid, 3:5]))
      meta["hash"].append(_unwords(g[valid, 5:7]))
      bar.update(int(valid.sum()))
      done += int(valid.sum())
      if not g_full.any():
        finished = True
        break
    chunk_ids = np.concatenate(ids).astype(np.int64)
    chunk = {k: np.concatenate(v) for k, v in cols.items()}
    if check is not None:
      check(chunk_ids, chunk)
    if distributed.is_main():
      with io.atomic_path(chunk_path(out_dir, c)) as tmp:
        with open(tmp, "wb") as f:  # A file object: np.savez would otherwise append ".npz".
          np.savez(f, ids=chunk_ids, **chunk,
                   **{f"meta_{k}": np.concatenate(v) for k, v in meta.items()})
    if finished:  # Every process has read its whole share: the pool's counts, summed.
      for _ in stream:
        pass
      total = pool_stream.PoolCounts.from_array(_all_sum(counts.as_array()))
      if distributed.is_main():
        _write_cursor(out_dir, fingerprint, c + 1, c + 1, n_examples(out_dir, c + 1),
                      {"pool_counts": dataclasses.asdict(total)})
    elif distributed.is_main():
      _write_cursor(out_dir, fingerprint, c + 1, None, 0)
    c += 1
    bar.set_postfix(ex_s=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}")
  bar.close()
  distributed.barrier(f"jbat-stream-{fingerprint}")


def n_examples(out_dir: pathlib.Path, n_chunks: int) -> int:
  """Examples in the first n_chunks chunk files of out_dir."""
  total = 0
  for i in range(n_chunks):
    with np.load(chunk_path(out_dir, i)) as z:
      total += int(z["ids"].shape[0])
  return total


def pool_counts(out_dir: str | pathlib.Path) -> dict | None:
  """What the scoring pass of a streamed file pool read and left out (`PoolCounts` as a
  dict, summed over processes; None for an in-memory pool), from a score_pool out_dir."""
  path = scores_dir(out_dir) / CURSOR_FILE
  return json.loads(path.read_text()).get("pool_counts") if path.exists() else None


# ----------------------------------------------------------------------------- driver


def score_pool(scores: Sequence[str], surrogate: surrogate_lib.Surrogate | None,
               pool_examples: Sequence[dict[str, Any]], out_dir: str | pathlib.Path,
               batches: Batches, *, mesh: jax.sharding.Mesh | None = None,
               adapt_examples: Sequence[dict[str, Any]] | None = None,
               texts: tuple[Sequence[str], Sequence[str]] | None = None, seed: int = 0,
               less_proj_dim: int | None = None, progress: bool = True,
               control: surrogate_lib.Surrogate | None = None,
               cache_dir: str | pathlib.Path | None = None,
               less_warmup: less_lib.LessWarmup | None = None) -> ScoreTable:
  """Scores every pool example with each named score; resumable; returns the whole table.

  Args:
    scores: names from SCORE_NAMES (see the module docstring), in any order, no repeats.
    surrogate: phi0 / phi_s / graphdef / rest (may be None when only dsir / random are asked).
    pool_examples: encoded pool ({"id", "ids"}), scored in this order.
    out_dir: chunk files and cursor (see the module docstring).
    batches: rows per batch (a multiple of the mesh's `data` axis size), batches per chunk
      file (and per cursor update) and the model's Scorable (batch maker, loss, example
      hasher; the LM's from token length and pad id by default).
    adapt_examples: needed by `less` (the adaptation examples' features) and `less_1ckpt`
      (mean adaptation gradient at phi_s).
    texts: (pool texts parallel to pool_examples, adaptation texts); needed by `dsir`.
    seed: `random` scores, the `less` warm-up subset and the projection keys.
    less_proj_dim: project gradients to this many dims for `less_1ckpt` (None: exact cosine;
      the projected target and, when under MAX_PROJECTION_WORDS_BYTES, the packed projection
      matrix are computed once per run, not per batch) and for `less` (None: LESS's 8192).
    control: the control surrogate (its phi_s is phi_c; its phi0 must equal the surrogate's
      structure); needed by `contrast` and `contrast_align`, ignored otherwise.
    cache_dir: when given, the chunks and cursor live in cache_dir/<fingerprint>/ instead of
      out_dir, shared by every run whose inputs are the same (a new workdir with the same
      config, another arm scoring the same way); out_dir then only gets a `source.json`
      pointing there.
    less_warmup: the `less` warm-up and feature settings (default
      `less_warmup.LessWarmup.of(less_proj_dim)`: the paper's, projected to less_proj_dim).
  Returns:
    ScoreTable(ids int64[N], {name: float32[N]}) in pool order.
  Raises:
    JbatError: unknown / repeated score names, empty pool, missing inputs for a score,
      phi_s not shaped like phi0, batch size not divisible by the devices, non-finite scores
      (the message lists the first 10 offending example ids), or a cursor from other inputs.
  """
  batch_size, model = batches.batch_size, batches.scorable()
  chunk_batches = batches.chunk_batches
  pool_texts, adapt_texts = texts if texts is not None else (None, None)
  streamed = hasattr(pool_examples, "local_examples")
  scores = list(scores)
  unknown = [s for s in scores if s not in SCORE_NAMES]
  if unknown or not scores or len(set(scores)) != len(scores):
    raise JbatError(f"scoring: scores must be distinct names from {list(SCORE_NAMES)}, got "
                    f"{scores}")
  n = 0 if streamed else len(pool_examples)
  if n == 0 and not streamed:
    raise JbatError("scoring: the backbone pool is empty (no examples to score)")
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise JbatError(f"scoring: batch_size must be a positive int, got {batch_size!r}")
  if not isinstance(chunk_batches, int) or chunk_batches <= 0:
    raise JbatError(f"scoring: chunk_batches must be a positive int, got {chunk_batches!r}")
  mesh = mesh or loop.data_mesh()
  n_dev = mesh.shape["data"]
  if batch_size % n_dev:
    raise JbatError(f"scoring: batch_size {batch_size} must be a multiple of the number of "
                    f"devices on the mesh's data axis ({n_dev})")
  model_names = [s for s in scores if s in MODEL_SCORES]
  if model_names and surrogate is None:
    raise JbatError(f"scoring: {model_names} need a surrogate (got None)")
  if surrogate is not None:
    kernels.check_same_structure(surrogate.phi0, surrogate.phi_s, name="phi_s")
  control_names = [s for s in scores if s in CONTROL_SCORES]
  if control_names:
    if control is None:
      raise JbatError(f"scoring: {control_names} need a control surrogate (control=None)")
    kernels.check_same_structure(surrogate.phi0, control.phi_s, name="control phi_s")
  for name in ("less", "less_1ckpt"):
    if name in scores and not adapt_examples:
      raise JbatError(f"scoring: '{name}' needs adapt_examples (the adaptation set)")
  if "dsir" in scores and streamed:
    if not adapt_texts:
      raise JbatError("scoring: 'dsir' needs texts=(None, adaptation texts) for a file pool")
  elif "dsir" in scores:
    if pool_texts is None or not adapt_texts:
      raise JbatError("scoring: 'dsir' needs texts=(pool texts, adaptation texts)")
    if len(pool_texts) != n:
      raise JbatError(f"scoring: pool_texts has {len(pool_texts)} entries for {n} pool "
                      f"examples (they must be parallel)")

  chunk_size = chunk_batches * batch_size
  n_chunks = -(-n // chunk_size)
  settings = {"batch_size": batch_size, "seed": seed, "chunk_batches": chunk_batches,
              "less_proj_dim": less_proj_dim, "version": 1}
  if "less_1ckpt" in scores:
    # The LESS target is the mean gradient over adapt_examples, and a projected score depends
    # on the definition of the Rademacher matrix.
    settings["less_adapt"] = _examples_digest(adapt_examples or (), model)
    if less_proj_dim is not None:
      settings["projection"] = kernels.PROJECTION_VERSION
  if "less" in scores:
    less_spec = less_warmup or less_lib.LessWarmup.of(less_proj_dim)
    settings["less_adapt"] = _examples_digest(adapt_examples or (), model)
    settings["less"] = less_spec.record()
  uses_texts = "dsir" in scores
  if uses_texts:
    settings["dsir"] = dsir_lib.DSIR_VERSION
  if streamed:
    # The chunks hold each process's rows in turn: the sharding is part of what they are.
    settings.update(pool=pool_examples.fingerprint, processes=jax.process_count(),
                    local_rows=_local_size(batch_size, mesh), version=2)
  fingerprint = _fingerprint(scores, surrogate if model_names else None,
                             [] if streamed else pool_examples,
                             settings, pool_texts if uses_texts else None,
                             adapt_texts if uses_texts else None,
                             control.phi_s if control_names else None, model=model)
  out_dir = pathlib.Path(out_dir)
  if cache_dir is not None:
    if distributed.is_main():
      io.write_json_atomic(out_dir / "source.json", {"scores": str(pathlib.Path(cache_dir) /
                                                                   fingerprint)})
    out_dir = pathlib.Path(cache_dir) / fingerprint
  out_dir.mkdir(parents=True, exist_ok=True)
  if streamed:
    if _read_cursor(out_dir, fingerprint, None) is None:
      return load_table(out_dir, scores)
  else:
    start = _read_cursor(out_dir, fingerprint, n_chunks)
    if start == n_chunks:
      return load_table(out_dir, scores)

  params, jitted = {}, {}
  if model_names:
    params = distributed.place_params({"rest": surrogate.rest, "phi0": surrogate.phi0,
                             "phi_s": surrogate.phi_s, "delta": surrogate.delta}, mesh)
    params["key"] = jax.random.key(seed)
    if control_names:
      params["phi_c"] = loop.replicate(control.phi_s, mesh)
      params["delta_c"] = loop.replicate(kernels.tree_sub(surrogate.phi_s, control.phi_s), mesh)
    if "less_1ckpt" in scores:
      params["target"] = _mean_adapt_grad(surrogate, adapt_examples, batch_size, model, mesh,
                                          params["rest"], params["phi_s"])
      if less_proj_dim is not None:
        params["target"], words = _less_projection(params["phi_s"], params["target"],
                                                   params["key"], less_proj_dim, mesh)
        if words is not None:
          params["words"] = words
    jitted = _make_model_kernels([s for s in model_names if s != "less"], surrogate,
                                 less_proj_dim, model.loss)
    if "less" in scores:
      jitted["less"] = _less_warmup_kernel(surrogate, pool_examples, adapt_examples, less_spec,
                                           batch_size, model, mesh, params, seed, progress)
  random_fn = jax.jit(lambda key, words, valid: kernels.random_scores(key, words, valid))
  if "dsir" in scores:
    target_logp = dsir_lib.fit_ngram_model(adapt_texts)
    pool_logp = (_stream_ngram_model(pool_examples, mesh) if streamed
                 else dsir_lib.fit_ngram_model(pool_texts))

  def compute(dev):
    out = {}
    for fn in jitted.values():
      out.update(fn(params, dev))
    if "random" in scores:
      out["random"] = random_fn(jax.random.key(seed), dev["id_words"], dev["valid"])
    return {f"score_{k}": v.astype(jnp.float32) for k, v in out.items() if k in scores}

  def finish_chunk(lo, hi, ids, chunk):
    if "dsir" in scores:
      chunk["score_dsir"] = dsir_lib.dsir_scores(pool_texts[lo:hi], target_logp, pool_logp,
                                                 gumbel=dsir_lib.gumbel_noise(seed, ids))
    return {f"score_{s}": chunk[f"score_{s}"] for s in scores}

  def check(ids, chunk):
    _check_finite(ids, {k[len("score_"):]: v for k, v in chunk.items()})

  if streamed:
    local = None
    if "dsir" in scores:
      local = lambda part: {"score_dsir": dsir_lib.dsir_scores(  # noqa: E731
          [ex["text"] for ex in part], target_logp, pool_logp)}
    _stream_file_chunks(pool_examples, out_dir, fingerprint, compute, batch_size=batch_size,
                        model=model, mesh=mesh, chunk_batches=chunk_batches,
                        desc="score pool", progress=progress, local_columns=local,
                        check=check)
    return load_table(out_dir, scores)
  _stream_chunks(pool_examples, out_dir, fingerprint, compute, batch_size=batch_size,
                 model=model, mesh=mesh, chunk_batches=chunk_batches,
                 desc="score pool", progress=progress, finish_chunk=finish_chunk, check=check)
  return load_table(out_dir, scores)


def _check_finite(ids: np.ndarray, chunk: dict[str, np.ndarray]) -> None:
  """JbatError naming the score and the first 10 example ids whose score is NaN or inf."""
  for name, values in chunk.items():
    bad = ~np.isfinite(values)
    if bad.any():
      raise JbatError(f"scoring: {int(bad.sum())} non-finite (NaN/inf) '{name}' scores; first "
                      f"example ids: {ids[bad][:10].tolist()} (check these documents and the "
                      f"adapters; scoring stopped)")


# ----------------------------------------------------------------------------- features


def load_features(out_dir: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(ids int64[N], features float32[N, d]) of a finished `pool_grad_features` folder."""
  out_dir = pathlib.Path(out_dir)
  path = out_dir / CURSOR_FILE
  cursor = json.loads(path.read_text()) if path.exists() else {}
  if not cursor.get("done"):
    raise JbatError(f"{out_dir}: feature extraction is not finished (cursor "
                    f"{cursor or 'missing'}); run pool_grad_features again to continue it")
  ids, feats = [], []
  for i in range(int(cursor["n_chunks"])):
    with np.load(chunk_path(out_dir, i)) as z:
      ids.append(z["ids"])
      feats.append(z["features"])
  return (np.concatenate(ids).astype(np.int64),
          np.concatenate(feats).astype(np.float32))


def pool_grad_features(surrogate: surrogate_lib.Surrogate,
                       examples: Sequence[dict[str, Any]], out_dir: str | pathlib.Path,
                       batches: Batches, *, proj_dim: int,
                       mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                       progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Projected per-example gradients at phi_s: f_i = R^T flat(grad_phi l(z_i; phi_s)).

  R is the seeded Rademacher matrix of `kernels.project` (key = jax.random.key(seed), entries
  +-1/sqrt(d)), so <f_i, f_j> ~ <g_i, g_j> (the LESS features). Use the same seed for the pool
  and the adaptation set when comparing them. Streamed, chunked and resumable exactly like
  `score_pool` (chunk files hold "ids" and "features" f32[n, d]; cursor fingerprinted).
  Cost: ~3F per example plus |phi| x d multiply-adds; memory B x |phi| per batch, plus the
  packed matrix (|phi| x d / 8 bytes, made once when under MAX_PROJECTION_WORDS_BYTES).

  Returns:
    (ids int64[N] in the order of `examples`, features float32[N, proj_dim]); invalid
    (padding) rows never appear.
  Raises:
    JbatError: empty examples, bad proj_dim / batch sizes, non-finite features, or a cursor
      from other inputs.
  """
  batch_size, model = batches.batch_size, batches.scorable()
  chunk_batches = batches.chunk_batches
  n = len(examples)
  if n == 0:
    raise JbatError("features: no examples to compute gradient features for")
  if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim <= 0:
    raise JbatError(f"features: proj_dim must be a positive int, got {proj_dim!r}")
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise JbatError(f"features: batch_size must be a positive int, got {batch_size!r}")
  if not isinstance(chunk_batches, int) or chunk_batches <= 0:
    raise JbatError(f"features: chunk_batches must be a positive int, got {chunk_batches!r}")
  mesh = mesh or loop.data_mesh()
  if batch_size % mesh.shape["data"]:
    raise JbatError(f"features: batch_size {batch_size} must be a multiple of the number of "
                    f"devices on the mesh's data axis ({mesh.shape['data']})")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  chunk_size = chunk_batches * batch_size
  n_chunks = -(-n // chunk_size)
  settings = {"batch_size": batch_size, "seed": seed, "chunk_batches": chunk_batches,
              "proj_dim": proj_dim, "version": 1, "projection": kernels.PROJECTION_VERSION}
  fingerprint = _fingerprint(["grad_features"], surrogate, examples, settings, None, None,
                             model=model)
  start = _read_cursor(out_dir, fingerprint, n_chunks)
  if start == n_chunks:
    return load_features(out_dir)

  graphdef = surrogate.graphdef

  @jax.jit
  def feats(rest, phi_s, key, words, batch):
    loss_fn = surrogate_lib.per_example_loss_fn(graphdef, rest, model.loss)
    return kernels.project(kernels.per_example_grads(loss_fn, phi_s, batch), key, proj_dim,
                           words=words)

  params = distributed.place_params({"rest": surrogate.rest, "phi_s": surrogate.phi_s}, mesh)
  key = jax.random.key(seed)
  words = _projection_words(surrogate.phi_s, key, proj_dim, mesh)  # None: regenerate per batch.
  def compute(dev):
    return {"features": feats(params["rest"], params["phi_s"], key, words, dev)}

  def check(ids, chunk):
    bad = ~np.isfinite(chunk["features"]).all(axis=1)
    if bad.any():
      raise JbatError(f"features: {int(bad.sum())} non-finite gradient features; first example "
                      f"ids: {ids[bad][:10].tolist()}")

  _stream_chunks(examples, out_dir, fingerprint, compute, batch_size=batch_size,
                 model=model, mesh=mesh, chunk_batches=chunk_batches,
                 desc="grad features", progress=progress, check=check)
  return load_features(out_dir)


def cosine_matrix(a: np.ndarray, b: np.ndarray, *, chunk: int = 8192,
                  eps: float = 1e-12) -> np.ndarray:
  """C[i, j] = <a_i, b_j> / (||a_i|| ||b_j||), float32[N, M], computed `chunk` rows at a time.

  a: [N, d], b: [M, d]. Rows with norm <= eps give 0. Memory: the N x M output plus one
  chunk x d block (60k x 32 floats is 7.7 MB). The per-adaptation-example similarities of the
  `round_robin` rule: a = pool features, b = adaptation features (`pool_grad_features`).
  """
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise JbatError(f"cosine_matrix: expected [N, d] and [M, d], got {a.shape} and {b.shape}")
  nb = np.linalg.norm(b, axis=1)
  bn = b / np.where(nb > eps, nb, np.inf)[:, None]
  out = np.empty((a.shape[0], b.shape[0]), np.float32)
  for lo in range(0, a.shape[0], chunk):
    blk = a[lo:lo + chunk]
    na = np.linalg.norm(blk, axis=1)
    out[lo:lo + chunk] = (blk / np.where(na > eps, na, np.inf)[:, None]) @ bn.T
  return out
