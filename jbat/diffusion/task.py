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
from jbat.diffusion.denoiser import Denoiser, make_denoiser
from jbat.diffusion.pretrain import pretrain_ema
from jbat.diffusion.schema import TRAIN_KEYS, denoiser_config, subject_classes
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
class Subject:
  """One subject: a k-means cluster of one class's test images, split adaptation / val / test."""

  name: str  # "<class name>-<rank>", e.g. "sneaker-0" (rank 0: the largest cluster)
  cls: int
  rank: int
  adapt_x: np.ndarray  # f32[n_subject, H, W, C]: teaches "[V] <class>"
  val_x: np.ndarray  # validation images of the subject
  test_x: np.ndarray  # test images of the subject (the headline metrics)
  drift_x: np.ndarray  # other images of the class (outside the cluster)
  cluster_size: int
  centre: np.ndarray  # f64[H*W*C]: the cluster's mean (the oracle ranks pool images by it)


@dataclasses.dataclass(frozen=True)
class SubjectTask:
  """Every subject, the backbone pool and the pretraining set."""

  subjects: list[Subject]
  pool_ids: np.ndarray  # int64[P]: indices into the train split
  pretrain_ids: np.ndarray  # int64: train-split indices the backbone is pretrained on
  cluster_sizes: dict[int, list[int]]  # class -> its k-means cluster sizes, largest first
  # subject name -> the oracle arm's ranking of pool ids, best first (`oracle_ids`).
  oracle_ids: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def make_subjects(data: images.ImageData, config: ml_collections.ConfigDict,
                  cls: int) -> tuple[list[Subject], list[int]]:
  """The `subjects_per_class` largest k-means clusters (pixel space, config.seed) of class
  `cls`'s test images, each shuffled (seed) and split adaptation / validation / test; the
  class's images outside every subject cluster measure drift. Also the cluster sizes."""
  d = config.data
  class_idx = np.flatnonzero(data.test_y == cls)
  x = data.test_x[class_idx].reshape(len(class_idx), -1)
  labels = selection.kmeans(x, d.n_clusters, seed=config.seed)
  sizes = np.bincount(labels, minlength=d.n_clusters)
  order = sorted(range(d.n_clusters), key=lambda j: (-sizes[j], j))
  chosen = order[:d.subjects_per_class]
  rng = np.random.default_rng([config.seed, 1, cls])
  others = rng.permutation(class_idx[~np.isin(labels, chosen)])[:d.n_drift]
  name = data.class_names[cls]
  out = []
  for rank, j in enumerate(chosen):
    members = class_idx[labels == j]
    if len(members) < d.n_subject + d.n_val + 2:
      raise JbatError(f"config: subject {name}-{rank} is a cluster of {len(members)} images; "
                      f"need at least data.n_subject + data.n_val + 2 = "
                      f"{d.n_subject + d.n_val + 2} (use fewer data.n_clusters)")
    members = rng.permutation(members)
    a, v = d.n_subject, d.n_subject + d.n_val
    out.append(Subject(name=f"{name}-{rank}", cls=cls, rank=rank,
                       adapt_x=data.test_x[members[:a]], val_x=data.test_x[members[a:v]],
                       test_x=data.test_x[members[v:v + d.n_heldout]],
                       drift_x=data.test_x[others], cluster_size=int(len(members)),
                       centre=x[labels == j].astype(np.float64).mean(axis=0)))
  return out, [int(sizes[j]) for j in order]


def make_task(data: images.ImageData, config: ml_collections.ConfigDict) -> SubjectTask:
  """Deterministic (config.seed) subjects / pool / pretraining split."""
  d = config.data
  subjects, sizes = [], {}
  for cls in subject_classes(config):
    subs, sizes[cls] = make_subjects(data, config, cls)
    subjects += subs
  n_train = len(data.train_y)
  pool_ids = np.sort(np.random.default_rng([config.seed, 2]).permutation(n_train)[
      :min(d.pool_size, n_train)]).astype(np.int64)
  keep = np.ones(n_train, bool)
  for cls in subject_classes(config):
    in_cls = np.flatnonzero(data.train_y == cls)
    drop = np.random.default_rng([config.seed, 3, cls]).permutation(in_cls)[
        round(d.backbone_keep * len(in_cls)):]
    keep[drop] = False
  return SubjectTask(subjects=subjects, pool_ids=pool_ids,
                     pretrain_ids=np.flatnonzero(keep).astype(np.int64), cluster_sizes=sizes,
                     oracle_ids={s.name: oracle_ids(s, data.train_x[pool_ids],
                                                    data.train_y[pool_ids], pool_ids)
                                 for s in subjects})


def oracle_ids(sub: Subject, pool_x: np.ndarray, pool_y: np.ndarray,
               pool_ids: np.ndarray) -> np.ndarray:
  """The oracle arm's ranking for a subject: the pool images of the subject's class, nearest
  (pixel space) to the subject's k-means centre first (ties by id); int64 pool ids. The oracle
  takes the first aug.k, as many distinct images as every other pool arm. The text tasks'
  oracle draws the target's own documents from the pool; the nearest to that here are the
  pool's images of the same kind of item, known from the labels and the held-out test
  clusters, which no selecting arm may use."""
  pos = np.flatnonzero(pool_y == sub.cls)
  x = pool_x[pos].reshape(len(pos), -1).astype(np.float64)
  d2 = ((x - sub.centre) ** 2).sum(-1)
  return pool_ids[pos[np.lexsort((pool_ids[pos], d2))]].astype(np.int64)


def data_mesh() -> jax.sharding.Mesh:
  return loop.data_mesh()


def load_or_pretrain_backbone(config: ml_collections.ConfigDict, data: images.ImageData,
                              task: SubjectTask, cache: pathlib.Path
                              ) -> tuple[Denoiser, pathlib.Path, bool]:
  """The class-conditional backbone (cached): (model, folder, loaded from cache?)."""
  mcfg = denoiser_config(config, data.image_size)
  b = config.backbone
  x, y = data.train_x[task.pretrain_ids], data.train_y[task.pretrain_ids]
  key = _key("denoiser-v2", dataclasses.asdict(mcfg), b.to_dict(), config.seed, data.name,
             _digest(x, y))
  folder = cache / "diffusion" / "backbones" / key
  weights = folder / "model.safetensors"
  model = make_denoiser(mcfg, rngs=nnx.Rngs(config.seed))
  if weights.exists():
    nnx.update(model, io.load_tree(weights, nnx.state(model, nnx.Param)))
    return model, folder, True
  it = images.MixtureIterator(
      [images.Source(x, y, np.zeros_like(y), rows=b.batch_size)], seed=config.seed,
      p_uncond=b.p_uncond, null_label=mcfg.null_label)
  spec = loop.TrainSpec(steps=b.steps, lr=b.lr, warmup_steps=b.warmup_steps,
                        weight_decay=b.weight_decay, clip_norm=1.0, ckpt_every=b.ckpt_every,
                        keep=1, log_every=50, seed=config.seed)
  ema = pretrain_ema(model, it, spec, b.ema_decay, folder / "pretrain",
                     loss_fn=ddpm.train_loss, batch_keys=TRAIN_KEYS, progress=config.progress,
                     desc="pretrain denoiser")
  nnx.update(model, ema)  # the backbone is the EMA of the pretraining weights
  io.write_json_atomic(folder / "denoiser_config.json", dataclasses.asdict(mcfg))
  io.save_tree(nnx.state(model, nnx.Param), weights)
  shutil.rmtree(folder / "pretrain", ignore_errors=True)
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
