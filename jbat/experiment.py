"""The main job, top to bottom: data -> tokenizer -> backbone -> adaptation arms -> report.

`run(config)` is what `python -m jbat.train --config configs/<name>.py` executes after the config
has been validated. Each stage is a call into its module; this file only wires them together,
so a reader can follow an experiment from here.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from jbat import backbone, io, lora, report
from jbat import config as config_lib
from jbat.data import pipeline, sources, tokenizer as tokenizer_lib
from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.models.hf_io import load_causal_lm
from jbat.training import loop


def log(msg: str) -> None:
  print(f"[jbat] {msg}", flush=True)


def load_corpus(config: ml_collections.ConfigDict, cache: pathlib.Path) -> list[sources.Document]:
  d = config.data
  if d.source == "fortunes":
    return sources.load_fortunes(sources.fortunes_dir(cache / "corpora"))
  if d.source == "jsonl":
    return sources.load_jsonl(d.path, text_field=d.text_field, label_field=d.label_field or None)
  return sources.load_text_folder(d.path)


def lm_config(config: ml_collections.ConfigDict, vocab_size: int) -> LMConfig:
  m = config.model
  cfg = LMConfig(vocab_size=vocab_size, max_len=config.data.max_len, d_model=m.d_model,
                 n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads or None,
                 d_ff=m.d_ff, pos=m.pos, norm=m.norm, mlp=m.mlp,
                 tie_embeddings=m.tie_embeddings, qkv_bias=m.qkv_bias, bias=m.bias, dtype=m.dtype)
  cfg.validate()
  return cfg


def check_batch_sizes(config: ml_collections.ConfigDict, n_devices: int) -> None:
  """Global batch sizes split evenly over devices (and so over processes)."""
  for key in ("train.batch_size", "train.eval_batch_size", "backbone.batch_size"):
    section, name = key.split(".")
    if config[section][name] % n_devices:
      raise JbatError(f"config: {key}={config[section][name]} must be a multiple of the "
                      f"number of devices ({n_devices})")


def train_arm(arm: str, base: CausalLM, config: ml_collections.ConfigDict, adapt, heldout,
              pad_id: int, workdir: pathlib.Path, mesh) -> dict[str, Any]:
  """Trains a fresh adapter on the arm's training stream; returns its summary."""
  if arm != "none":
    raise JbatError(f"arm {arm!r} is not implemented")
  model = nnx.clone(base)
  lcfg = lora.LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                         targets=config.lora.targets)
  lora.apply_lora(model, lcfg, rngs=nnx.Rngs(config.seed))
  t = config.train
  train_iter = pipeline.train_loader(adapt, t.batch_size // jax.process_count(),
                                     config.data.max_len, pad_id, config.seed,
                                     shard_index=jax.process_index(),
                                     shard_count=jax.process_count())
  spec = loop.TrainSpec(steps=t.steps, lr=t.lr, warmup_steps=t.warmup_steps,
                        weight_decay=t.weight_decay, clip_norm=t.clip_norm,
                        eval_every=t.eval_every, ckpt_every=t.ckpt_every, keep=t.keep,
                        log_every=t.log_every, seed=config.seed)
  arm_dir = workdir / "arms" / arm
  start = time.perf_counter()
  result = loop.fit(
      model, nnx.LoRAParam, train_iter, spec, arm_dir, mesh=mesh, progress=config.progress,
      desc=f"adapt [{arm}]",
      eval_batches=lambda: pipeline.eval_batches(
          heldout, t.eval_batch_size // jax.process_count(), config.data.max_len, pad_id,
          shard_index=jax.process_index(), shard_count=jax.process_count()))
  io.save_tree(result.params, arm_dir / "adapter.safetensors")
  evals = [r for r in result.history if "eval_loss" in r]
  return {"arm": arm, "backbone_loss": evals[0]["eval_loss"], "best_loss": result.best_loss,
          "best_step": result.best_step, "final_loss": evals[-1]["eval_loss"],
          "steps": t.steps, "seconds": time.perf_counter() - start,
          "adapter_params": lora.count_params(model)["adapter"]}


def get_backbone(config: ml_collections.ConfigDict, task: sources.Task, cache: pathlib.Path,
                 mesh) -> tuple[CausalLM, Any, pathlib.Path, bool]:
  """(backbone, tokenizer, where it lives, whether it was loaded rather than trained)."""
  if config.model.pretrained:
    log(f"backbone: loading Hugging Face model {config.model.pretrained}")
    base, tok = load_causal_lm(config.model.pretrained, dtype=config.model.dtype, mesh=mesh)
    if config.data.max_len > base.cfg.max_len:
      raise JbatError(f"config: data.max_len={config.data.max_len} exceeds the model's "
                      f"max_position_embeddings ({base.cfg.max_len})")
    return base, tok, pathlib.Path(config.model.pretrained), True
  tok = tokenizer_lib.get_or_train_tokenizer([d.text for d in task.pool], config.data.vocab_size,
                                             cache / "tokenizers")
  b = config.backbone
  spec = backbone.PretrainSpec(steps=b.steps, batch_size=b.batch_size, lr=b.lr,
                               warmup_steps=b.warmup_steps, weight_decay=b.weight_decay,
                               max_len=config.data.max_len, ckpt_every=b.ckpt_every,
                               seed=config.seed)
  log("backbone: looking up cache / pretraining on the pool")
  base, folder, cached = backbone.load_or_pretrain(lm_config(config, vocab_size=len(tok)), spec,
                                                   task.pool, tok, cache, mesh=mesh,
                                                   progress=config.progress)
  return base, tok, folder, cached


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs the whole experiment described by a validated config; returns the results."""
  t0 = time.perf_counter()
  cache = config_lib.cache_dir(config)
  if not jax.config.jax_compilation_cache_dir:  # Reruns skip XLA compilation.
    jax.config.update("jax_compilation_cache_dir", str(cache / "xla"))
  check_batch_sizes(config, jax.device_count())
  mesh = loop.data_mesh()

  log(f"data: loading {config.data.source} corpus")
  docs = load_corpus(config, cache)
  task = sources.make_task(docs, config.data.domain, config.data.n_adapt, config.data.n_heldout,
                           config.seed)
  log(f"data: {len(task.adapt)} adaptation / {len(task.heldout)} held-out documents of "
      f"{config.data.domain!r}; backbone pool {len(task.pool)} documents")
  workdir = config_lib.prepare_workdir(config)
  log(f"workdir: {workdir}")

  base, tok, folder, cached = get_backbone(config, task, cache, mesh)
  lm_cfg = base.cfg
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
  log(f"backbone: {n_params:,} parameters, {'loaded from cache' if cached else 'pretrained'} "
      f"({folder})")

  adapt = pipeline.encode(task.adapt, tok, config.data.max_len)
  heldout = pipeline.encode(task.heldout, tok, config.data.max_len)
  results = []
  for arm in config_lib.arm_list(config):
    log(f"arm {arm}: training a fresh LoRA adapter")
    r = train_arm(arm, base, config, adapt, heldout, tok.pad_token_id, workdir, mesh)
    log(f"arm {arm}: held-out NLL backbone {r['backbone_loss']:.4f} -> best "
        f"{r['best_loss']:.4f} (step {r['best_step']}), final {r['final_loss']:.4f}")
    results.append(r)

  summary = {"config": config.name, "domain": config.data.domain, "backbone_params": n_params,
             "backbone_cached": cached, "backbone_dir": str(folder),
             "n_adapt": len(task.adapt), "n_heldout": len(task.heldout), "n_pool": len(task.pool),
             "arms": results, "seconds": time.perf_counter() - t0,
             "lm_config": dataclasses.asdict(lm_cfg)}
  io.write_json_atomic(workdir / "results.json", summary)
  report.write_report(workdir, summary)
  log(f"report: {workdir / 'report.md'}")
  return summary
