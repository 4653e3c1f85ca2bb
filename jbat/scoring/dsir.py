"""DSIR as in its paper (Xie et al. 2023, "Data Selection for Language Models via Importance
Resampling"): hashed n-gram importance weights and Gumbel top-k resampling (no model; numpy).

A document is lowercased and split like NLTK's WordPunctTokenizer (regex `\\w+|[^\\w\\s]+`:
words and runs of punctuation); its features are its word unigrams and bigrams (`ngram`), each
hashed to one of `n_buckets` (default 10,000, the paper's) buckets with zlib.crc32 of the UTF-8
n-gram text (stable across runs and machines, unlike Python's salted `hash`). A "model" is the
bucket distribution of a corpus, with the paper's floor:

  log p(b) = log(count(b) / sum_b' count(b') + 1e-8).

The log importance weight of a document x with features f_1..f_m (repeats counted) is

  log w(x) = sum_j [log p_target(f_j) - log p_raw(f_j)]      (not length-normalised),

target = the adaptation set, raw = the pool. Resampling as the paper's code does it: k
documents without replacement with probability proportional to w, by the Gumbel top-k trick:
the k largest log w(x) + G(x), G i.i.d. standard Gumbel. The `dsir` score of jbat's streams is
that perturbed weight (`gumbel_noise`, seeded by the run seed and the example id), so the
`topk` rule on it is exactly DSIR's resampling; `dsir_scores(..., gumbel=None)` gives log w.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable, Sequence

import numpy as np

from jbat.errors import JbatError

_TOKEN = re.compile(r"\w+|[^\w\s]+")
N_BUCKETS = 10_000  # The paper's number of hash buckets.
FLOOR = 1e-8  # Added to every bucket probability before the log (the paper's code).
# Names the definition above (fingerprinted with stream scores, so older dsir scores, which were
# Laplace-smoothed, length-normalised and noise-free, are never reused).
DSIR_VERSION = "dsir-paper-v1"


def _check_ngram(ngram: Sequence[int]) -> tuple[int, ...]:
  ngram = tuple(ngram)
  if not ngram or any(not isinstance(n, int) or n < 1 for n in ngram):
    raise JbatError(f"dsir: ngram must be a non-empty tuple of positive ints, got {ngram!r}")
  return ngram


def tokenize(text: str) -> list[str]:
  """Lowercased word-punct tokens: runs of word characters and runs of punctuation."""
  return _TOKEN.findall(text.lower())


def hash_ngrams(text: str, n_buckets: int = N_BUCKETS,
                ngram: Sequence[int] = (1, 2)) -> np.ndarray:
  """Bucket ids int64[m] of the document's n-grams (m = number of n-grams, repeats kept)."""
  tokens = tokenize(text)
  ids = []
  for n in _check_ngram(ngram):
    for i in range(len(tokens) - n + 1):
      ids.append(zlib.crc32(" ".join(tokens[i:i + n]).encode("utf-8")) % n_buckets)
  return np.asarray(ids, dtype=np.int64)


def fit_ngram_model(texts: Iterable[str], n_buckets: int = N_BUCKETS,
                    ngram: Sequence[int] = (1, 2)) -> np.ndarray:
  """log(p(b) + 1e-8), float64[n_buckets]: the hashed n-gram bucket distribution of `texts`
  (p = count / total; all zeros for texts without any n-gram)."""
  if not isinstance(n_buckets, int) or isinstance(n_buckets, bool) or n_buckets < 1:
    raise JbatError(f"dsir: n_buckets must be a positive int, got {n_buckets!r}")
  counts = np.zeros(n_buckets, dtype=np.float64)
  for text in texts:
    counts += np.bincount(hash_ngrams(text, n_buckets, ngram), minlength=n_buckets)
  return np.log(counts / max(counts.sum(), 1.0) + FLOOR)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's output function on uint64[N] (wrapping arithmetic): a bijective mixer."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def gumbel_noise(seed: int, ids: Sequence[int] | np.ndarray) -> np.ndarray:
  """float64[N] standard Gumbel draws, one per example id, from (seed, id) alone (so they do not
  depend on the pool's order or chunking): -log(-log u) with u = (top 53 bits of
  splitmix64(splitmix64(seed) ^ id) + 0.5) / 2^53, uniform in (0, 1)."""
  ids = np.asarray(ids, dtype=np.int64).view(np.uint64)
  with np.errstate(over="ignore"):
    base = _splitmix64(np.asarray([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    bits = _splitmix64(ids ^ base) >> np.uint64(11)
  u = (bits.astype(np.float64) + 0.5) / float(2 ** 53)
  return -np.log(-np.log(u))


def dsir_scores(texts: Iterable[str], target_logp: np.ndarray, pool_logp: np.ndarray, *,
                ngram: Sequence[int] = (1, 2), normalize: bool = False,
                gumbel: np.ndarray | None = None) -> np.ndarray:
  """float32[N] per document: log w(x) = sum of log p_t - log p_raw over its n-grams (the mean
  if normalize; 0 for a document without n-grams), plus `gumbel` (float[N]) when given.

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
  out = np.asarray(out, dtype=np.float64)
  if gumbel is not None:
    gumbel = np.asarray(gumbel, dtype=np.float64)
    if gumbel.shape != out.shape:
      raise JbatError(f"dsir: gumbel has shape {gumbel.shape} for {out.shape[0]} documents")
    out = out + gumbel
  return out.astype(np.float32)
