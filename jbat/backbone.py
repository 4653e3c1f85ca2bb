"""Stage 0: the backbone. Full-parameter pretraining of the causal LM on the backbone pool.

BAT needs a backbone that was trained on the pool it later selects from. For the built-in demo
jbat trains one (a few minutes on a CPU) and caches it under
`<cache_dir>/backbones/<key>/model.safetensors`, where `key` hashes everything that determines
the weights (model config, pretraining settings, seed, tokenizer and pool contents): a later run
with the same inputs loads it instead of training. Pretraining checkpoints as it goes, so an
interrupted pretraining resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from collections.abc import Sequence

import jax
from flax import nnx

from jbat import io
from jbat.data import pipeline
from jbat.data.sources import Document
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.training import loop


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
  steps: int
  batch_size: int
  lr: float
  warmup_steps: int
  weight_decay: float
  max_len: int
  ckpt_every: int
  seed: int


def cache_key(lm_cfg: LMConfig, spec: PretrainSpec, tokenizer_json: str,
              pool: Sequence[Document]) -> str:
  """Content hash of everything that determines the pretrained weights."""
  h = hashlib.sha256()
  same = ("remat", "vocab_chunk", "grad_rows")  # Values the same either way.
  arch = {k: v for k, v in dataclasses.asdict(lm_cfg).items() if k not in same}
  h.update(json.dumps(arch, sort_keys=True).encode())
  h.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
  h.update(hashlib.sha256(tokenizer_json.encode()).digest())
  for d in pool:
    h.update(f"{d.id}\x00{d.text}\x01".encode())
  return h.hexdigest()[:20]


def init_model(lm_cfg: LMConfig, seed: int) -> CausalLM:
  return CausalLM(lm_cfg, rngs=nnx.Rngs(seed))


def load_or_pretrain(lm_cfg: LMConfig, spec: PretrainSpec, pool: Sequence[Document],
                     tokenizer, cache_dir: pathlib.Path, *, mesh: jax.sharding.Mesh,
                     progress: bool = True) -> tuple[CausalLM, pathlib.Path, bool]:
  """Returns (backbone model, its cache folder, whether it came from the cache)."""
  key = cache_key(lm_cfg, spec, tokenizer.backend_tokenizer.to_str(), pool)
  folder = pathlib.Path(cache_dir) / "backbones" / key
  weights = folder / "model.safetensors"
  model = init_model(lm_cfg, spec.seed)
  # Two runs that need the same backbone at once: the second waits for the first and loads
  # its weights instead of pretraining into the same folder (one process per run only).
  with io.file_lock(pathlib.Path(cache_dir) / "backbones" / f".{key}.lock",
                    enabled=jax.process_count() == 1):
    if weights.exists():
      state = io.load_tree(weights, nnx.state(model, nnx.Param))
      nnx.update(model, state)
      return model, folder, True
    examples = pipeline.encode(pool, tokenizer, spec.max_len)
    train_iter = pipeline.train_loader(examples, spec.batch_size // jax.process_count(),
                                       spec.max_len, tokenizer.pad_token_id, spec.seed,
                                       pack=True, shard_index=jax.process_index(),
                                       shard_count=jax.process_count())
    train_spec = loop.TrainSpec(steps=spec.steps, lr=spec.lr, warmup_steps=spec.warmup_steps,
                                weight_decay=spec.weight_decay, clip_norm=1.0,
                                ckpt_every=spec.ckpt_every, keep=1, log_every=25,
                                seed=spec.seed)
    result = loop.fit(model, nnx.Param, train_iter, train_spec, folder / "pretrain", mesh=mesh,
                      progress=progress, desc="backbone pretraining")
    nnx.update(model, result.params)
    io.write_json_atomic(folder / "lm_config.json", dataclasses.asdict(lm_cfg))
    io.save_tree(nnx.state(model, nnx.Param), weights)
    shutil.rmtree(folder / "pretrain" / "checkpoints", ignore_errors=True)
  return model, folder, False
