"""ALBAT stages 1-3 in one call: surrogate -> score the pool -> select -> manifest.

  workdir/surrogate/    phi0.safetensors, phi_s.safetensors, fit/ (checkpoints, metrics)
  workdir/scores/       chunk_*.npz + cursor.json (resumable streaming scores)
  workdir/selection/    manifest.jsonl, summary.json, score_hist.png

Every stage skips work already in `workdir`: a finished surrogate is loaded, scoring continues
from its cursor, and a finished manifest is returned as is. BAT training (stage 4) reads the
manifest.
"""

from __future__ import annotations

import pathlib

import jax

from jbat import lora, selection, surrogate as surrogate_lib
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
                         less_proj_dim: int | None = None) -> pathlib.Path:
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
  Raises:
    JbatError: see train_surrogate, stream.score_pool and selection.select.
  """
  workdir = pathlib.Path(workdir)
  manifest = workdir / "selection" / "manifest.jsonl"
  if manifest.exists():
    return manifest
  if score not in stream.SCORE_NAMES:
    raise JbatError(f"albat.score: expected one of {list(stream.SCORE_NAMES)}, got {score!r}")
  if not task.pool:
    raise JbatError("albat: the backbone pool is empty (no examples to select from)")
  k = selection.resolve_k(k, len(task.adapt))
  mesh = mesh or loop.data_mesh()
  pad_id = tokenizer.pad_token_id
  adapt = pipeline.encode(task.adapt, tokenizer, max_len)
  pool = pipeline.encode(task.pool, tokenizer, max_len)

  sur = None
  if score in stream.MODEL_SCORES:
    sur = surrogate_lib.train_surrogate(base, lora_cfg, adapt, surrogate_spec,
                                        workdir / "surrogate", batch_size=batch_size,
                                        max_len=max_len, pad_id=pad_id, seed=seed, mesh=mesh,
                                        progress=progress)
  table = stream.score_pool(
      [score], sur, pool, workdir / "scores", batch_size=batch_size, max_len=max_len,
      pad_id=pad_id, mesh=mesh, adapt_examples=adapt,
      pool_texts=[d.text for d in task.pool] if score == "dsir" else None,
      adapt_texts=[d.text for d in task.adapt] if score == "dsir" else None,
      seed=seed, less_proj_dim=less_proj_dim, chunk_batches=chunk_batches, progress=progress)
  hashes = {d.id: sources.text_hash(d.text) for d in task.pool}
  chosen = selection.select(table, score, k=k, tau=tau, ids_to_hash=hashes)
  return selection.write_manifest(chosen, {d.id: d for d in task.pool}, workdir)
