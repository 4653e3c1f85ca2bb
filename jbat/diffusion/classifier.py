"""A small CNN classifier of the backbone's images: class predictions and image embeddings.

It stands in for the CLIP/DINO models DreamBooth evaluates with: trained inside jbat on the
backbone's training split, it says which class a generated sample looks like, and its
penultimate layer (an L2-normalised embedding e(x) in R^E) measures how close generated
samples are to real subject images.

  h = avgpool2(relu(conv3x3(x)))  -> avgpool2(relu(conv3x3(h)))  -> flatten
  e = relu(Linear(h))  f32[B, E];   logits = Linear(e)  f32[B, n_classes]

Images f32[B, S, S, C] with S divisible by 4.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  image_size: int = 28
  channels: int = 1
  n_classes: int = 10
  width: int = 16  # Channels of the first conv (the second has 2x).
  embed_dim: int = 128


class Classifier(nnx.Module):
  """CNN classifier; `embed` gives the penultimate features, `__call__` the logits."""

  def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    w = cfg.width
    self.conv1 = nnx.Conv(cfg.channels, w, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(w, 2 * w, (3, 3), rngs=rngs)
    flat = (cfg.image_size // 4) ** 2 * 2 * w
    self.fc = nnx.Linear(flat, cfg.embed_dim, rngs=rngs)
    self.head = nnx.Linear(cfg.embed_dim, cfg.n_classes, rngs=rngs)

  def embed(self, x: jax.Array) -> jax.Array:
    """Penultimate features f32[B, E] (not normalised)."""
    pool = lambda h: nnx.avg_pool(h, (2, 2), strides=(2, 2))
    h = pool(jax.nn.relu(self.conv1(x)))
    h = pool(jax.nn.relu(self.conv2(h)))
    return jax.nn.relu(self.fc(h.reshape(h.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.embed(x))


def train_loss(model: Classifier, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
  """sum_i weight_i CE(logits_i, label_i): `loop.fit`'s loss_fn (rng unused)."""
  del rng
  ce = optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["label"])
  return jnp.sum(batch["weight"] * ce)


@nnx.jit
def _predict(model: Classifier, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  e = model.embed(x)
  return jnp.argmax(model.head(e), axis=-1), e / (jnp.linalg.norm(e, axis=-1,
                                                                  keepdims=True) + 1e-8)


def predict(model: Classifier, x: np.ndarray, batch_size: int = 512
            ) -> tuple[np.ndarray, np.ndarray]:
  """(predicted class int32[N], L2-normalised embedding f32[N, E]) for images f32[N,S,S,C]."""
  preds, embs = [], []
  for lo in range(0, len(x), batch_size):
    chunk = np.asarray(x[lo:lo + batch_size], np.float32)
    n = len(chunk)
    if n < batch_size:  # one compiled shape
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.float32)])
    p, e = _predict(model, jnp.asarray(chunk))
    preds.append(np.asarray(p)[:n])
    embs.append(np.asarray(e)[:n])
  return np.concatenate(preds).astype(np.int32), np.concatenate(embs)


def mean_cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
  """1 - mean over all pairs (i, j) of <a_i, b_j> for L2-normalised rows (DINO-score style)."""
  return float(1.0 - np.mean(np.asarray(a, np.float64) @ np.asarray(b, np.float64).T))
