"""Image data for the diffusion tasks: Fashion-MNIST, scikit-learn's digits, and batch streams.

Images are float32 in [-1, 1], NHWC ([N, H, W, 1] here); labels int32[N].

* Fashion-MNIST (28x28, 10 classes, 60k train / 10k test) comes from Debian's
  `dataset-fashion-mnist` package: gzipped idx files under /usr/share/datasets/fashion-mnist.
  If the system has no copy, the .deb is fetched with `apt-get download` and unpacked with
  `dpkg -x` inside the cache dir (no root needed), then renamed atomically into
  `<cache_dir>/fashion-mnist`.
* digits (8x8, 10 classes, 1,797 images, values 0..16) are bundled with scikit-learn (imported
  only when used); a seeded 70/30 split gives "train" and "test". Tests use them: no download.

`MixtureIterator` is the training stream `jbat.training.loop.fit` consumes: endless, every batch
a pure function of (seed, step), state {"step": s} (JSON), so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jbat.data import sources as sources_lib
from jbat.errors import JbatError

FASHION_PACKAGE = "dataset-fashion-mnist"
SYSTEM_FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle-boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
DATASETS = ("fashion_mnist", "digits")


@dataclasses.dataclass(frozen=True)
class ImageData:
  """A labelled image dataset with a train and a test split (images in [-1, 1], NHWC)."""

  name: str
  train_x: np.ndarray  # f32[N, H, W, C]
  train_y: np.ndarray  # int32[N]
  test_x: np.ndarray
  test_y: np.ndarray
  class_names: tuple[str, ...]

  @property
  def image_size(self) -> int:
    return int(self.train_x.shape[1])


# ----------------------------------------------------------------------------- fetching


def _has_fashion(directory: pathlib.Path) -> bool:
  return all((directory / f).is_file() for pair in FASHION_FILES.values() for f in pair)


def fashion_mnist_dir(cache_dir: str | os.PathLike) -> pathlib.Path:
  """A folder holding the four gzipped Fashion-MNIST idx files.

  Order of preference: /usr/share/datasets/fashion-mnist; `<cache_dir>/fashion-mnist`;
  otherwise `apt-get download dataset-fashion-mnist` + `dpkg -x` into a temporary folder in
  `cache_dir`, renamed atomically to `<cache_dir>/fashion-mnist` (an interrupted fetch leaves
  no half-written cache). Raises JbatError (with the fix) if apt-get / dpkg fail.
  """
  if _has_fashion(SYSTEM_FASHION):
    return SYSTEM_FASHION
  cache_dir = pathlib.Path(cache_dir)
  target = cache_dir / "fashion-mnist"
  if _has_fashion(target):
    return target
  return sources_lib.fetch_debian_folder(
      [FASHION_PACKAGE], str(SYSTEM_FASHION.relative_to("/")), target, _has_fashion,
      f"copy the idx .gz files of {SYSTEM_FASHION} into {target}.")


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """An idx file (optionally .gz) as a uint8 array: magic 0x0000 08 <ndim>, big-endian dims."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise JbatError(f"{path}: not a uint8 idx file (magic {raw[:4].hex()})")
  ndim = raw[3]
  dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise JbatError(f"{path}: header says {dims} ({int(np.prod(dims))} values), file has "
                    f"{data.size}")
  return data.reshape(dims)


def to_unit_range(pixels: np.ndarray, max_value: float) -> np.ndarray:
  """[0, max_value] -> float32 [-1, 1]: x / max_value * 2 - 1."""
  return (np.asarray(pixels, np.float32) / np.float32(max_value)) * 2.0 - 1.0


def load_fashion_mnist(cache_dir: str | os.PathLike) -> ImageData:
  """Fashion-MNIST (fetched if needed): train 60k / test 10k images f32[N, 28, 28, 1]."""
  d = fashion_mnist_dir(cache_dir)
  arrays = {}
  for split, (img_file, lbl_file) in FASHION_FILES.items():
    x = read_idx(d / img_file)
    y = read_idx(d / lbl_file)
    if x.ndim != 3 or y.shape != (x.shape[0],):
      raise JbatError(f"{d}: {split} images {x.shape} and labels {y.shape} do not match")
    arrays[split] = (to_unit_range(x, 255.0)[..., None], y.astype(np.int32))
  return ImageData("fashion_mnist", *arrays["train"], *arrays["test"], FASHION_CLASSES)


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> ImageData:
  """scikit-learn's digits (8x8): a seeded split into train / test (test_fraction of them)."""
  # Imported here: only the tests and toy runs need scikit-learn.
  from sklearn.datasets import load_digits as sk_digits
  bunch = sk_digits()
  x = to_unit_range(bunch.images, 16.0)[..., None]
  y = bunch.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  n_test = round(test_fraction * len(y))
  te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
  return ImageData("digits", x[tr], y[tr], x[te], y[te], DIGIT_CLASSES)


def load(name: str, cache_dir: str | os.PathLike) -> ImageData:
  """`name` in DATASETS: "fashion_mnist" (28x28, fetched) or "digits" (8x8, bundled)."""
  if name == "fashion_mnist":
    return load_fashion_mnist(cache_dir)
  if name == "digits":
    return load_digits()
  raise JbatError(f"data.dataset: expected one of {list(DATASETS)}, got {name!r}")


# ----------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class Source:
  """Rows of one part of a training batch: `rows` examples drawn per step from (x, label,
  ident), each with loss weight `weight / rows` (so each source's mean loss gets `weight`)."""

  x: np.ndarray  # f32[N, H, W, C]
  label: np.ndarray  # int32[N]
  ident: np.ndarray  # int32[N]
  rows: int
  weight: float = 1.0

  def __post_init__(self):
    n = len(self.x)
    if n == 0 or len(self.label) != n or len(self.ident) != n:
      raise JbatError(f"data: a batch source needs non-empty x/label/ident of equal length, "
                      f"got {len(self.x)}/{len(self.label)}/{len(self.ident)}")


class MixtureIterator:
  """Endless batches: per step, each Source contributes `rows` rows drawn without replacement
  within the step (with replacement across steps) by numpy Generator([seed, step, source]).

  Batch: x f32[B,H,W,C], label int32[B], ident int32[B], weight f32[B] (sums to the sum of the
  source weights), valid bool[B]. With p_uncond > 0 each row's label becomes `null_label`
  (and its identifier 0) with that probability (classifier-free guidance training).
  State: {"step": int}; get_state / set_state make it resumable.
  """

  def __init__(self, sources: Sequence[Source], seed: int, *, p_uncond: float = 0.0,
               null_label: int = -1):
    if not sources:
      raise JbatError("data: MixtureIterator needs at least one source")
    self.sources = list(sources)
    self.seed = int(seed)
    self.p_uncond = float(p_uncond)
    self.null_label = int(null_label)
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = {k: [] for k in ("x", "label", "ident", "weight")}
    for j, s in enumerate(self.sources):
      rng = np.random.default_rng([self.seed, self.step, j])
      n = len(s.x)
      idx = rng.permutation(n)[:s.rows] if s.rows <= n else rng.integers(0, n, s.rows)
      label, ident = s.label[idx].copy(), s.ident[idx].copy()
      if self.p_uncond > 0:
        drop = rng.random(s.rows) < self.p_uncond
        label[drop], ident[drop] = self.null_label, 0
      parts["x"].append(s.x[idx])
      parts["label"].append(label)
      parts["ident"].append(ident)
      parts["weight"].append(np.full(s.rows, s.weight / s.rows, np.float32))
    self.step += 1
    batch = {k: np.concatenate(v) for k, v in parts.items()}
    batch["label"] = batch["label"].astype(np.int32)
    batch["ident"] = batch["ident"].astype(np.int32)
    batch["valid"] = np.ones(len(batch["label"]), bool)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    self.step = int(state["step"])


def eval_rows(x: np.ndarray, label: np.ndarray, ident: np.ndarray, seeds: np.ndarray,
              n_draws: int, batch_size: int, draws_fn) -> list[dict[str, np.ndarray]]:
  """Fixed-shape evaluation / scoring batches with seeded noise draws, padded with valid=False.

  draws_fn(seeds, n_draws, shape) -> (t int32[n, K], noise f32[n, K, *shape]) (see
  `jbat.diffusion.ddpm.seeded_draws`). Every batch has exactly `batch_size` rows; padding rows
  repeat row 0 of the batch with valid False, "index" gives each row's position in the input
  (-1 for padding).
  """
  n = len(x)
  out = []
  for lo in range(0, n, batch_size):
    idx = np.arange(lo, min(lo + batch_size, n))
    pad = batch_size - len(idx)
    full = np.concatenate([idx, np.full(pad, idx[0])])
    t, noise = draws_fn(seeds[full], n_draws, x.shape[1:])
    out.append({"x": x[full], "label": label[full].astype(np.int32),
                "ident": ident[full].astype(np.int32), "t": t, "noise": noise,
                "valid": np.arange(batch_size) < len(idx),
                "index": np.concatenate([idx, np.full(pad, -1)])})
  return out
