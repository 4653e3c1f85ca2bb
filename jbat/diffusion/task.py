"""The personalization task: the subject split, and the cached backbone and classifier."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jbat import io, lora, selection
from jbat.data import images
from jbat.diffusion import classifier as clf_lib
from jbat.diffusion import ddpm
from jbat.diffusion.denoiser import Denoiser
from jbat.diffusion.schema import TRAIN_KEYS, denoiser_config
from jbat.errors import JbatError
from jbat.training import loop


def _digest(*arrays: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _key(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class SubjectTask:
  """The subject (one k-means cluster of one class), its held-out rest, drift set and pool."""

  subject_x: np.ndarray  # f32[n_subject, H, W, C]
  heldout_x: np.ndarray
  drift_x: np.ndarray  # other images of the class (outside the cluster)
  pool_ids: np.ndarray  # int64[P]: indices into the train split
  pretrain_ids: np.ndarray  # int64: train-split indices the backbone is pretrained on
  cluster_sizes: list[int]


def make_task(data: images.ImageData, config: ml_collections.ConfigDict) -> SubjectTask:
  """Deterministic (config.seed) subject / held-out / drift / pool / pretraining split."""
  d = config.data
  cls = d.subject_class
  class_idx = np.flatnonzero(data.test_y == cls)
  x = data.test_x[class_idx].reshape(len(class_idx), -1)
  labels = selection.kmeans(x, d.n_clusters, seed=config.seed)
  sizes = np.bincount(labels, minlength=d.n_clusters)
  order = sorted(range(d.n_clusters), key=lambda j: (-sizes[j], j))
  chosen = order[d.cluster_rank]
  members = class_idx[labels == chosen]
  if len(members) < d.n_subject + 2:
    raise JbatError(f"config: data.cluster_rank {d.cluster_rank} picks a cluster of "
                    f"{len(members)} images; need at least data.n_subject + 2 = "
                    f"{d.n_subject + 2} (use fewer data.n_clusters)")
  rng = np.random.default_rng([config.seed, 1])
  members = rng.permutation(members)
  others = rng.permutation(class_idx[labels != chosen])[:d.n_drift]
  n_train = len(data.train_y)
  pool_ids = np.sort(np.random.default_rng([config.seed, 2]).permutation(n_train)[
      :min(d.pool_size, n_train)]).astype(np.int64)
  keep = np.ones(n_train, bool)
  in_cls = np.flatnonzero(data.train_y == cls)
  drop = np.random.default_rng([config.seed, 3]).permutation(in_cls)[
      round(d.backbone_keep * len(in_cls)):]
  keep[drop] = False
  return SubjectTask(subject_x=data.test_x[members[:d.n_subject]],
                     heldout_x=data.test_x[members[d.n_subject:d.n_subject + d.n_heldout]],
                     drift_x=data.test_x[others], pool_ids=pool_ids,
                     pretrain_ids=np.flatnonzero(keep).astype(np.int64),
                     cluster_sizes=[int(sizes[j]) for j in order])


def data_mesh() -> jax.sharding.Mesh:
  return loop.data_mesh()


def load_or_pretrain_backbone(config: ml_collections.ConfigDict, data: images.ImageData,
                              task: SubjectTask, cache: pathlib.Path
                              ) -> tuple[Denoiser, pathlib.Path, bool]:
  """The class-conditional backbone (cached): (model, folder, loaded from cache?)."""
  mcfg = denoiser_config(config, data.image_size)
  b = config.backbone
  x, y = data.train_x[task.pretrain_ids], data.train_y[task.pretrain_ids]
  key = _key("denoiser-v1", dataclasses.asdict(mcfg), b.to_dict(), config.seed, data.name,
             _digest(x, y))
  folder = cache / "diffusion" / "backbones" / key
  weights = folder / "model.safetensors"
  model = Denoiser(mcfg, rngs=nnx.Rngs(config.seed))
  if weights.exists():
    nnx.update(model, io.load_tree(weights, nnx.state(model, nnx.Param)))
    return model, folder, True
  it = images.MixtureIterator(
      [images.Source(x, y, np.zeros_like(y), rows=b.batch_size)], seed=config.seed,
      p_uncond=b.p_uncond, null_label=mcfg.null_label)
  spec = loop.TrainSpec(steps=b.steps, lr=b.lr, warmup_steps=b.warmup_steps,
                        weight_decay=b.weight_decay, clip_norm=1.0, ckpt_every=b.ckpt_every,
                        keep=1, log_every=50, seed=config.seed)
  result = loop.fit(model, nnx.Param, it, spec, folder / "pretrain", mesh=data_mesh(),
                    progress=config.progress, desc="pretrain denoiser",
                    loss_fn=ddpm.train_loss, batch_keys=TRAIN_KEYS)
  nnx.update(model, result.params)
  io.write_json_atomic(folder / "denoiser_config.json", dataclasses.asdict(mcfg))
  io.save_tree(nnx.state(model, nnx.Param), weights)
  shutil.rmtree(folder / "pretrain" / "checkpoints", ignore_errors=True)
  return model, folder, False


def load_or_train_classifier(config: ml_collections.ConfigDict, data: images.ImageData,
                             cache: pathlib.Path) -> tuple[clf_lib.Classifier, float, bool]:
  """The evaluation classifier (cached): (model, test accuracy, loaded from cache?)."""
  c = config.classifier
  ccfg = clf_lib.ClassifierConfig(image_size=data.image_size, n_classes=10, width=c.width,
                                  embed_dim=c.embed_dim)
  key = _key("classifier-v1", dataclasses.asdict(ccfg), c.to_dict(), config.seed, data.name,
             _digest(data.train_x, data.train_y))
  folder = cache / "diffusion" / "classifiers" / key
  weights = folder / "model.safetensors"
  model = clf_lib.Classifier(ccfg, rngs=nnx.Rngs(config.seed))
  cached = weights.exists()
  if cached:
    nnx.update(model, io.load_tree(weights, nnx.state(model, nnx.Param)))
  else:
    y = data.train_y
    it = images.MixtureIterator([images.Source(data.train_x, y, np.zeros_like(y),
                                               rows=c.batch_size)], seed=config.seed)
    spec = loop.TrainSpec(steps=c.steps, lr=c.lr, warmup_steps=0, clip_norm=1.0,
                          keep=1, log_every=50, seed=config.seed)
    result = loop.fit(model, nnx.Param, it, spec, folder / "fit", mesh=data_mesh(),
                      progress=config.progress, desc="classifier",
                      loss_fn=clf_lib.train_loss, batch_keys=TRAIN_KEYS)
    nnx.update(model, result.params)
    io.save_tree(nnx.state(model, nnx.Param), weights)
    shutil.rmtree(folder / "fit" / "checkpoints", ignore_errors=True)
  pred, _ = clf_lib.predict(model, data.test_x)
  return model, float(np.mean(pred == data.test_y)), cached


def with_lora(backbone: Denoiser, config: ml_collections.ConfigDict, seed: int) -> Denoiser:
  """A copy of the backbone with LoRA (A drawn from nnx.Rngs(seed), B = 0, identifier 0)."""
  model = nnx.clone(backbone)
  lora.apply_lora(model, lora.LoRAConfig(config.lora.rank, float(config.lora.alpha),
                                         config.lora.targets), rngs=nnx.Rngs(seed))
  return model
