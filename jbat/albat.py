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

import hashlib
import json
import pathlib

import jax
import numpy as np

from jbat import distributed, lora, selection, surrogate as surrogate_lib
from jbat.data import pipeline, sources
from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM
from jbat.scoring import stream
from jbat.training import loop


def select_backbone_data(base: CausalLM, lora_cfg: lora.LoRAConfig, task: sources.Task,
                         tokenizer, *, score: str, k: int | str,
                         tau: float | None | str = "default", surrogate_spec: loop.TrainSpec,
                         batch_size: int, max_len: int, seed: int,
                         workdir: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
                         progress: bool = True, chunk_batches: int = 64,
                         less_proj_dim: int | None = None, rule: str = "topk", top_n: int = 0,
                         n_clusters: int = 8, select_seed: int = 0,
                         feature_dim: int = 64,
                         score_cache: str | pathlib.Path | None = None,
                         init_adapter=None,
                         surrogate_cache: str | pathlib.Path | None = None) -> pathlib.Path:
  """Runs ALBAT selection for `task` and returns workdir/selection/manifest.jsonl.

  Args:
    base: the frozen backbone; lora_cfg: the adapter of the surrogate (init seed = `seed`).
    task: adaptation set (trains the surrogate, `less`/`dsir` targets) and backbone pool.
    tokenizer: encodes both (pipeline.encode, max_len); its pad id pads batches.
    score: one of stream.SCORE_NAMES; k: absolute or "<m>x" |D_A| (selection.resolve_k).
    tau: threshold (selection.select); "default" = 0 for align/loss_diff, none otherwise.
    surrogate_spec: optimisation of the surrogate; batch_size: surrogate and scoring batches
      (a multiple of the device count).
    chunk_batches, less_proj_dim: see stream.score_pool.
    rule, top_n, n_clusters, select_seed: the selection rule (selection.select; select_seed
      is its `seed`).
    feature_dim: Rademacher projection size of the gradient features of rules cluster
      (k-means features) and round_robin (LESS cosine to each adaptation example); the
      features are computed for the candidates C only (selection.candidate_rows).
    score_cache: a folder shared between runs (e.g. <cache_dir>/scores): the pool scores are
      kept there under their content fingerprint (stream.score_pool's cache_dir), so a new
      workdir with the same backbone, surrogate and pool does not score again.
    init_adapter: the surrogate starts from this adapter instead of a fresh init (BAT
      re-selection around the current adapter; train_surrogate's `init`).
    surrogate_cache: a folder shared between runs (e.g. <cache_dir>/surrogates) where trained
      surrogates are kept by content (train_surrogate's `cache_dir`).
  Raises:
    JbatError: see train_surrogate, stream.score_pool and selection.select.
  """
  workdir = pathlib.Path(workdir)
  manifest = workdir / "selection" / "manifest.jsonl"
  if score not in stream.SCORE_NAMES:
    raise JbatError(f"albat.score: expected one of {list(stream.SCORE_NAMES)}, got {score!r}")
  if rule not in selection.RULES:
    raise JbatError(f"albat.rule: expected one of {list(selection.RULES)}, got {rule!r}")
  if not task.pool:
    raise JbatError("albat: the backbone pool is empty (no examples to select from)")
  k = selection.resolve_k(k, len(task.adapt))
  request = {"score": score, "k": k, "tau": tau, "rule": rule, "top_n": int(top_n),
             "n_clusters": int(n_clusters), "select_seed": int(select_seed),
             "feature_dim": int(feature_dim)}
  request = json.loads(json.dumps(request))
  if manifest.exists() and _stored_request(workdir) == request:
    return manifest
  distributed.barrier("jbat-albat-request")  # Every process has read the stored request.
  if distributed.is_main():
    manifest.unlink(missing_ok=True)
  mesh = mesh or loop.data_mesh()
  pad_id = tokenizer.pad_token_id
  adapt = pipeline.encode(task.adapt, tokenizer, max_len)
  pool = pipeline.encode(task.pool, tokenizer, max_len)
  sur_kw = dict(batch_size=batch_size, max_len=max_len, pad_id=pad_id, seed=seed, mesh=mesh,
                progress=progress, cache_dir=surrogate_cache)

  sur = control = None
  if score in stream.MODEL_SCORES or rule in ("cluster", "round_robin"):
    sur = surrogate_lib.train_surrogate(base, lora_cfg, adapt, surrogate_spec,
                                        workdir / "surrogate", init=init_adapter, **sur_kw)
  if score in stream.CONTROL_SCORES:
    picks = control_indices(len(pool), len(adapt), seed)
    control = surrogate_lib.train_surrogate(base, lora_cfg, [pool[i] for i in picks],
                                            surrogate_spec, workdir / "control", **sur_kw)
  table = stream.score_pool(
      [score], sur, pool, workdir / "scores", batch_size=batch_size, max_len=max_len,
      pad_id=pad_id, mesh=mesh, adapt_examples=adapt,
      pool_texts=[d.text for d in task.pool] if score == "dsir" else None,
      adapt_texts=[d.text for d in task.adapt] if score == "dsir" else None,
      seed=seed, less_proj_dim=less_proj_dim, chunk_batches=chunk_batches, progress=progress,
      control=control, cache_dir=score_cache)
  hashes = {d.id: sources.text_hash(d.text) for d in task.pool}
  features = per_example = None
  if rule in ("cluster", "round_robin"):
    features, per_example = _rule_features(
        rule, table, score, tau, top_n, hashes, sur, pool, adapt, workdir / "features",
        feature_dim=feature_dim, batch_size=batch_size, max_len=max_len, pad_id=pad_id,
        mesh=mesh, seed=seed, chunk_batches=chunk_batches, progress=progress)
  chosen = selection.select(table, score, k=k, tau=tau, rule=rule, top_n=int(top_n),
                            seed=int(select_seed), ids_to_hash=hashes, features=features,
                            per_example=per_example, n_clusters=int(n_clusters))
  # Every process holds the same selection; process 0 writes it, the others wait for it.
  if distributed.is_main():
    selection.write_manifest(chosen, {d.id: d for d in task.pool}, workdir,
                             extra_summary={"request": request})
  distributed.barrier("jbat-albat-manifest")
  return manifest


def top_pool_ids(workdir: str | pathlib.Path, score: str, n: int) -> list[int]:
  """Ids of the n best-scored pool documents (by `score`, ties by id) of a finished
  select_backbone_data workdir: the candidates a re-selection rescores."""
  table = stream.load_table(stream.scores_dir(pathlib.Path(workdir) / "scores"), [score])
  order = np.lexsort((table.ids, -table.scores[score]))
  return [int(i) for i in table.ids[order[:n]]]


def control_indices(n_pool: int, n_adapt: int, seed: int) -> list[int]:
  """Pool positions of the control surrogate's training set: min(n_adapt, n_pool) distinct
  positions drawn by numpy Generator(seed), sorted."""
  rng = np.random.default_rng(seed)
  return sorted(int(i) for i in rng.choice(n_pool, size=min(n_adapt, n_pool), replace=False))


def _stored_request(workdir: pathlib.Path) -> dict | None:
  """The "request" of workdir/selection/summary.json (None if missing or unreadable)."""
  path = workdir / "selection" / "summary.json"
  try:
    return json.loads(path.read_text()).get("request")
  except (OSError, json.JSONDecodeError):
    return None


def _rule_features(rule, table, score, tau, top_n, hashes, sur, pool, adapt, folder, *,
                   feature_dim, batch_size, max_len, pad_id, mesh, seed, chunk_batches,
                   progress) -> tuple[np.ndarray | None, np.ndarray | None]:
  """Projected-gradient features of the candidates C, as arrays parallel to the table rows
  (rows outside C stay 0 and are never read): (features [N, d], None) for cluster,
  (None, cosine to each adaptation example [N, |D_A|]) for round_robin."""
  cand = selection.candidate_rows(table, score, tau=tau, top_n=int(top_n), ids_to_hash=hashes)
  digest = hashlib.sha256(np.asarray(table.ids[cand], np.int64).tobytes()
                          + str(feature_dim).encode()).hexdigest()[:12]
  kw = dict(proj_dim=int(feature_dim), batch_size=batch_size, max_len=max_len, pad_id=pad_id,
            mesh=mesh, seed=seed, chunk_batches=chunk_batches, progress=progress)
  # Table rows are pool order (score_pool), so row r is pool[r].
  _, feats = stream.pool_grad_features(sur, [pool[int(r)] for r in cand],
                                       folder / f"pool_{digest}", **kw)
  n = len(table)
  if rule == "cluster":
    out = np.zeros((n, feats.shape[1]), np.float32)
    out[cand] = feats
    return out, None
  _, afeats = stream.pool_grad_features(sur, adapt, folder / f"adapt_d{int(feature_dim)}", **kw)
  out = np.zeros((n, afeats.shape[0]), np.float32)
  out[cand] = stream.cosine_matrix(feats, afeats)
  return None, out
