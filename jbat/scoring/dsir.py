"""DSIR-style hashed n-gram importance weights (no model; numpy only).

A document is lowercased and split into word tokens (regex `\\w+`); its features are the word
n-grams for each n in `ngram` (default unigrams and bigrams), each hashed to one of `n_buckets`
buckets with zlib.crc32 of the UTF-8 n-gram text (stable across runs and machines, unlike
Python's salted `hash`). A "model" is the smoothed bucket distribution of a corpus:

  log p(b) = log((count(b) + alpha) / (sum_b' count(b') + alpha * n_buckets)).

The importance score of a document x with features f_1..f_m is the log likelihood ratio

  w(x) = sum_j [log p_target(f_j) - log p_pool(f_j)]      (divided by m if normalize=True),

so documents that look like the target (adaptation) set more than the pool score higher.
Length normalisation (default) keeps long documents from dominating; empty documents score 0.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable, Sequence

import numpy as np

from jbat.errors import JbatError

_WORD = re.compile(r"\w+")


def _check_ngram(ngram: Sequence[int]) -> tuple[int, ...]:
  ngram = tuple(ngram)
  if not ngram or any(not isinstance(n, int) or n < 1 for n in ngram):
    raise JbatError(f"dsir: ngram must be a non-empty tuple of positive ints, got {ngram!r}")
  return ngram


def hash_ngrams(text: str, n_buckets: int, ngram: Sequence[int] = (1, 2)) -> np.ndarray:
  """Bucket ids int64[m] of the document's word n-grams (m = number of n-grams)."""
  tokens = _WORD.findall(text.lower())
  ids = []
  for n in _check_ngram(ngram):
    for i in range(len(tokens) - n + 1):
      ids.append(zlib.crc32(" ".join(tokens[i:i + n]).encode("utf-8")) % n_buckets)
  return np.asarray(ids, dtype=np.int64)


def fit_ngram_model(texts: Iterable[str], n_buckets: int = 2**16,
                    ngram: Sequence[int] = (1, 2), alpha: float = 1.0) -> np.ndarray:
  """Smoothed log-probabilities float64[n_buckets] of hashed n-gram buckets over `texts`.

  Additive (Laplace, alpha) smoothing, so every bucket has a finite log-probability.
  """
  if not isinstance(n_buckets, int) or n_buckets < 1:
    raise JbatError(f"dsir: n_buckets must be a positive int, got {n_buckets!r}")
  if alpha <= 0:
    raise JbatError(f"dsir: alpha (smoothing) must be > 0, got {alpha!r}")
  counts = np.zeros(n_buckets, dtype=np.float64)
  for text in texts:
    counts += np.bincount(hash_ngrams(text, n_buckets, ngram), minlength=n_buckets)
  return np.log(counts + alpha) - np.log(counts.sum() + alpha * n_buckets)


def dsir_scores(texts: Iterable[str], target_logp: np.ndarray, pool_logp: np.ndarray, *,
                ngram: Sequence[int] = (1, 2), normalize: bool = True) -> np.ndarray:
  """Importance score float32[N] per document: sum (or mean if normalize) of log p_t - log p_p.

  `target_logp` and `pool_logp` come from `fit_ngram_model` with the same n_buckets and ngram.
  """
  target_logp = np.asarray(target_logp, dtype=np.float64)
  pool_logp = np.asarray(pool_logp, dtype=np.float64)
  if target_logp.ndim != 1 or target_logp.shape != pool_logp.shape:
    raise JbatError(f"dsir: target_logp and pool_logp must be 1-D of equal length (n_buckets), "
                    f"got {target_logp.shape} and {pool_logp.shape}")
  ratio = target_logp - pool_logp
  out = []
  for text in texts:
    ids = hash_ngrams(text, ratio.shape[0], ngram)
    s = float(ratio[ids].sum()) if ids.size else 0.0
    out.append(s / ids.size if normalize and ids.size else s)
  return np.asarray(out, dtype=np.float32)
