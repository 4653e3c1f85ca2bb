"""ALBAT stages 1-3 in one call: surrogate -> score the pool -> select -> manifest.

  workdir/surrogate/    phi0.safetensors, phi_s.safetensors, fit/ (checkpoints, metrics)
  workdir/control/      the control surrogate (only for the contrast scores): same spec, seed
                        and init, trained on |D_A| pool documents drawn by Generator(seed)
  workdir/scores/       chunk_*.npz + cursor.json (resumable streaming scores), or with
                        score_cache only source.json naming score_cache/<fingerprint>/
  workdir/features/     projected gradients at phi_s (rules cluster / round_robin only):
                        adapt_d<dim>/ and pool_<hash of the candidate ids and dim>/
  workdir/selection/    manifest.jsonl, summary.json, score_hist.png

Multi-process: every process calls this with the same arguments (each feeds its rows of the
scoring batches); process 0 writes every file, the others wait at barriers.

Every stage skips work already in `workdir`: a finished surrogate is loaded, scoring continues
from its cursor, and a finished manifest is returned as is when summary.json's "request"
(score, k, tau, rule, top_n, n_clusters, select_seed, feature_dim) equals this call's. When the
request differs (another rule, k, ...), the selection is recomputed from the stored scores
without rescoring and the manifest rewritten (it is deleted first, and written last, so a
manifest on disk always belongs to the request in its summary). BAT training (stage 4) reads
the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import jax
import numpy as np

from jbat import distributed, layout, lora, registry, selection, surrogate as surrogate_lib
from jbat.data import pipeline, pool_stream, sources
from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM
from jbat.scoring import less_warmup as less_lib
from jbat.scoring import stream
from jbat.training import loop


def select_backbone_data(base: CausalLM, lora_cfg: lora.LoRAConfig, task: sources.Task,
                         tokenizer, spec: selection.SelectSpec, *,
                         surrogate_spec: loop.TrainSpec, max_len: int, seed: int,
                         workdir: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                         progress: bool = True, init_adapter=None,
                         score_cache: str | pathlib.Path | None = None,
                         surrogate_cache: str | pathlib.Path | None = None,
                         adapt_examples=None, pool_examples=None) -> pathlib.Path:
  """Runs ALBAT selection for `task` and returns the folder's manifest (layout.manifest).

  Args:
    base: the frozen backbone; lora_cfg: the adapter of the surrogate (init seed = `seed`).
    task: adaptation set (trains the surrogate, `less`/`dsir` targets) and backbone pool.
    tokenizer: encodes both (pipeline.encode, max_len); its pad id pads batches.
    spec: the selection (score, k, tau, rule and its settings, scoring batches); its
      `request(|D_A|)` is recorded with the manifest. spec.batch_size is also the surrogate's
      batch (a multiple of the device count); spec.feature_dim is the Rademacher projection
      size of the gradient features of rules cluster and round_robin, computed for the
      candidates C only (selection.candidate_rows).
    surrogate_spec: optimisation of the surrogate; seed: its adapter init, data order, the
      control's draw, `random` scores and the projections.
    init_adapter: the surrogate starts from this adapter instead of a fresh init (BAT
      re-selection around the current adapter; train_surrogate's `init`).
    score_cache: a folder shared between runs (e.g. <cache_dir>/scores): the pool scores are
      kept there under their content fingerprint (stream.score_pool's cache_dir), so a new
      workdir with the same backbone, surrogate and pool does not score again.
    surrogate_cache: a folder shared between runs (e.g. <cache_dir>/surrogates) where trained
      surrogates are kept by content (train_surrogate's `cache_dir`).
    adapt_examples, pool_examples: already encoded examples of task.adapt and task.pool (same
      order, e.g. `jbat.data.formats` examples with response-only loss weights); None:
      `pipeline.encode` of the documents. pool_examples may also be a streamed file pool
      (`jbat.data.pool_stream.FilePool`; task.pool is then not read): it is scored a chunk
      at a time with each process reading its share, the scores are merged by id (the table
      sorted by id), and only the records the rules need (control sample, candidates'
      features, the selection) are read again, by location.
  Raises:
    JbatError: see train_surrogate, stream.score_pool and selection.select.
  """
  workdir = pathlib.Path(workdir)
  manifest = layout.manifest(workdir)
  streamed = hasattr(pool_examples, "local_examples")
  if not task.pool and not streamed:
    raise JbatError("albat: the backbone pool is empty (no examples to select from)")
  request = spec.request(len(task.adapt))
  k, score, rule = request["k"], spec.score, spec.rule
  if layout.selection_matches(workdir, request):
    return manifest
  distributed.barrier("jbat-albat-request")  # Every process has read the stored request.
  if distributed.is_main():
    manifest.unlink(missing_ok=True)
  mesh = mesh or loop.data_mesh()
  pad_id = tokenizer.pad_token_id
  adapt = (pipeline.encode(task.adapt, tokenizer, max_len) if adapt_examples is None
           else list(adapt_examples))
  pool = (pipeline.encode(task.pool, tokenizer, max_len) if pool_examples is None
          else pool_examples if streamed else list(pool_examples))
  sur_kw = dict(batch_size=spec.batch_size, max_len=max_len, pad_id=pad_id, seed=seed,
                mesh=mesh, progress=progress, cache_dir=surrogate_cache)

  sur = control = None
  if score in registry.MODEL_SCORES or spec.needs_features:
    sur = surrogate_lib.train_surrogate(base, lora_cfg, adapt, surrogate_spec,
                                        layout.surrogate_dir(workdir), init=init_adapter,
                                        **sur_kw)
  if score in registry.CONTROL_SCORES:
    if streamed:
      sample = [pool_stream.training_example(ex) for ex in pool.sample(len(adapt), seed)]
    else:
      sample = [pool[i] for i in control_indices(len(pool), len(adapt), seed)]
    control = surrogate_lib.train_surrogate(base, lora_cfg, sample,
                                            surrogate_spec, layout.control_dir(workdir),
                                            **sur_kw)
  batches = stream.Batches(batch_size=spec.batch_size, max_len=max_len, pad_id=pad_id,
                           chunk_batches=spec.chunk_batches)
  less_warmup, score_batches = None, batches
  if score == "less":  # With less_batch_size, the pool pass in bigger batches than the warm-up.
    less_warmup = less_lib.LessWarmup.of(
        spec.less_proj_dim, batch_size=spec.batch_size if spec.less_batch_size else None)
    if spec.less_batch_size:
      score_batches = dataclasses.replace(batches, batch_size=int(spec.less_batch_size))
  table = stream.score_pool(
      [score], sur, pool, layout.scores_dir(workdir), score_batches, mesh=mesh,
      less_warmup=less_warmup,
      adapt_examples=adapt,
      texts=((None if streamed else [d.text for d in task.pool], [d.text for d in task.adapt])
             if score == "dsir" else None),
      seed=seed, less_proj_dim=spec.less_proj_dim, progress=progress, control=control,
      cache_dir=score_cache)
  if streamed:
    table = table.sorted_by_id()  # The same table however the processes shared the pool.
    hashes = table.meta["hash"]
  else:
    hashes = {d.id: sources.text_hash(d.text) for d in task.pool}
  features = per_example = None
  if spec.needs_features:
    features, per_example = _rule_features(
        spec, table, hashes, sur, pool, adapt, layout.features_dir(workdir), batches,
        mesh=mesh, seed=seed, progress=progress)
  chosen = selection.select(table, score, k=k, tau=spec.tau, rule=rule, top_n=int(spec.top_n),
                            seed=int(spec.seed), ids_to_hash=hashes, features=features,
                            per_example=per_example, n_clusters=int(spec.n_clusters))
  # Every process holds the same selection; process 0 writes it, the others wait for it.
  if streamed:
    rows = np.searchsorted(table.ids, chosen.ids)
    docs = {ex["id"]: pool_stream.document(ex) for ex in pool.read(
        list(zip(table.meta["file"][rows].tolist(), table.meta["row"][rows].tolist())))}
  else:
    docs = {d.id: d for d in task.pool}
  if distributed.is_main():
    selection.write_manifest(chosen, docs, workdir, extra_summary={"request": request})
  distributed.barrier("jbat-albat-manifest")
  return manifest


def top_pool_ids(workdir: str | pathlib.Path, score: str, n: int) -> list[int]:
  """Ids of the n best-scored pool documents (by `score`, ties by id) of a finished
  select_backbone_data workdir: the candidates a re-selection rescores."""
  table = stream.load_table(stream.scores_dir(layout.scores_dir(workdir)), [score])
  order = np.lexsort((table.ids, -table.scores[score]))
  return [int(i) for i in table.ids[order[:n]]]


def top_pool_examples(workdir: str | pathlib.Path, score: str, n: int, pool
                      ) -> list[dict]:
  """The n best-scored examples (by `score`, ties by id) of a finished select_backbone_data
  workdir over a streamed file pool, read again from the files by location."""
  table = stream.load_table(stream.scores_dir(layout.scores_dir(workdir)), [score])
  order = np.lexsort((table.ids, -table.scores[score]))[:n]
  return pool.read(list(zip(table.meta["file"][order].tolist(),
                            table.meta["row"][order].tolist())))


def control_indices(n_pool: int, n_adapt: int, seed: int) -> list[int]:
  """Pool positions of the control surrogate's training set: min(n_adapt, n_pool) distinct
  positions drawn by numpy Generator(seed), sorted."""
  rng = np.random.default_rng(seed)
  return sorted(int(i) for i in rng.choice(n_pool, size=min(n_adapt, n_pool), replace=False))


def _rule_features(spec: selection.SelectSpec, table, hashes, sur, pool, adapt,
                   folder: pathlib.Path, batches, *, mesh, seed, progress
                   ) -> tuple[np.ndarray | None, np.ndarray | None]:
  """Projected-gradient features of the candidates C, as arrays parallel to the table rows
  (rows outside C stay 0 and are never read): (features [N, d], None) for cluster,
  (None, cosine to each adaptation example [N, |D_A|]) for round_robin."""
  cand = selection.candidate_rows(table, spec.score, tau=spec.tau, top_n=int(spec.top_n),
                                  ids_to_hash=hashes)
  feature_dim = int(spec.feature_dim)
  digest = hashlib.sha256(np.asarray(table.ids[cand], np.int64).tobytes()
                          + str(feature_dim).encode()).hexdigest()[:12]
  kw = dict(proj_dim=feature_dim, mesh=mesh, seed=seed, progress=progress)
  # Table rows are pool order (score_pool), so row r is pool[r]; a streamed pool's rows are
  # read again by location.
  if hasattr(pool, "local_examples"):
    cand_ex = [pool_stream.training_example(ex) for ex in pool.read(
        list(zip(table.meta["file"][cand].tolist(), table.meta["row"][cand].tolist())))]
  else:
    cand_ex = [pool[int(r)] for r in cand]
  _, feats = stream.pool_grad_features(sur, cand_ex,
                                       folder / f"pool_{digest}", batches, **kw)
  n = len(table)
  if spec.rule == "cluster":
    out = np.zeros((n, feats.shape[1]), np.float32)
    out[cand] = feats
    return out, None
  _, afeats = stream.pool_grad_features(sur, adapt, folder / f"adapt_d{feature_dim}", batches,
                                        **kw)
  out = np.zeros((n, afeats.shape[0]), np.float32)
  out[cand] = stream.cosine_matrix(feats, afeats)
  return None, out
