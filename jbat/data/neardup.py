"""Near-duplicate filtering: pool documents too close to an evaluation document are dropped.

Exact-text dedup (`sources.dedup`) keeps "VIDEO: X" beside "X", case and punctuation variants
and "RT @user: X" copies. Here a text is first normalised (`normalise`: URLs and hosts, RT/MT
prefixes and upper-case "VIDEO:"-style prefixes removed, lower case, punctuation dropped,
whitespace collapsed); two documents are near-duplicates when the Jaccard similarity of their
sets of character n-grams (n = 5) is >= a threshold (0.6).

`near_duplicates(pool, evaluation)` finds every pool document that is a near-duplicate of any
evaluation document (adaptation, validation, test) without comparing all pairs: MinHash
signatures (numpy, vectorised over all documents' n-grams at once) are cut into `bands` bands
of `rows` values; a pool document that equals an evaluation document on a whole band is a
candidate, and each candidate pair is verified with the exact Jaccard of the n-gram sets, so a
document is dropped only for a true similarity >= threshold. With 32 bands of 4 rows a pair at
Jaccard 0.6 becomes a candidate with probability 1 - (1 - 0.6^4)^32 = 0.988 (0.9999 at 0.7),
one at 0.1 with 0.003. Before MinHash an exact, vectorised pre-filter (`covered_share`) drops
the pool texts that cannot reach the threshold with any evaluation text.

`Index(evaluation)` builds the evaluation side once; its `find` then takes the pool a chunk at
a time (a streamed pool, `jbat.data.pool_stream.FilePool`), each text's answer its own.

Speed (benchmarks/near_dup.py: 200,000 tweet-like pool texts, 400 evaluation texts, one CPU
thread of a shared 2-core machine): ~17,000 pool documents per CPU second, i.e. about a minute
per million pool documents; memory is bounded by `chunk_docs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence

import numpy as np

NGRAM = 5
THRESHOLD = 0.6
BANDS = 32
ROWS = 4

_URL = re.compile(r"https?://\S+|www\.\S+|\b(?:[a-z0-9-]+\.)+[a-z]{2,}(?:/\S*)?", re.IGNORECASE)
_RT = re.compile(r"^\s*(?:rt|mt)\s+@\w+\s*:?\s*", re.IGNORECASE)
_PREFIX = re.compile(r"^\s*[A-Z][A-Z ]{1,24}:\s*")
_PUNCT = re.compile(r"[^\w\s]|_")
_ASCII_PUNCT = str.maketrans({c: " " for c in map(chr, range(128))
                              if not (c.isalnum() or c.isspace())})
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def normalise(text: str) -> str:
  """The text near-duplicates are compared on: URLs and hosts ("bbc.in/x") removed, leading
  "RT @user:" / "MT @user:" and upper-case "VIDEO:" / "IN PICTURES:" prefixes removed (any
  number, in any order), lower case, punctuation removed, whitespace collapsed."""
  t = _URL.sub(" ", text) if "." in text else text
  while True:
    stripped = _PREFIX.sub("", _RT.sub("", t, count=1), count=1)
    if stripped == t:
      break
    t = stripped
  t = t.lower()
  t = t.translate(_ASCII_PUNCT) if t.isascii() else _PUNCT.sub(" ", t)
  return " ".join(t.split())


def shingles(text: str, n: int = NGRAM) -> set[str]:
  """The character n-grams of the normalised text (the whole text when shorter than n; empty
  for an empty text)."""
  t = normalise(text)
  if len(t) <= n:
    return {t} if t else set()
  return {t[i:i + n] for i in range(len(t) - n + 1)}


def jaccard(a: set, b: set) -> float:
  """|a & b| / |a | b| (0 for two empty sets)."""
  union = len(a | b)
  return len(a & b) / union if union else 0.0


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser (uint64 -> uint64, wrapping)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def gram_hashes(texts: Sequence[str], n: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
  """(hashes, starts): one uint64 hash per character n-gram of every normalised text, all texts
  concatenated, and the index of each text's first n-gram (texts shorter than n give one
  n-gram, padded; empty texts none, start = -1). Computed on code points with numpy."""
  norm = [normalise(t) for t in texts]
  padded = [t.ljust(n, "\0") if t else "" for t in norm]
  counts = np.array([max(len(t) - n + 1, 0) for t in padded], dtype=np.int64)
  codes = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
  lengths = np.array([len(t) for t in padded], dtype=np.int64)
  text_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  # Positions of every n-gram's first character (n-grams never cross two texts).
  pos = np.repeat(text_start, counts) + (np.arange(counts.sum())
                                        - np.repeat(np.cumsum(counts) - counts, counts))
  h = np.zeros(len(pos), dtype=np.uint64)
  with np.errstate(over="ignore"):
    for i in range(n):
      h = _mix(h ^ codes[pos + i]) if len(pos) else h
  starts = np.where(counts > 0, np.cumsum(counts) - counts, -1)
  return h, starts


def _minhash(h: np.ndarray, starts: np.ndarray, num_perm: int, seed: int,
             chunk: int) -> np.ndarray:
  """MinHash signatures [len(starts), num_perm] from `gram_hashes` output: per hash function k
  (h -> a_k h + b_k mod 2^64, a_k odd) the minimum over each text's n-gram hashes; texts
  without n-grams (start -1) get all-ones rows. `chunk` bounds n-grams x functions at once."""
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
  b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
  sig = np.full((len(starts), num_perm), _MASK, dtype=np.uint64)
  has = np.flatnonzero(starts >= 0)
  if not len(has):
    return sig
  bounds = np.append(starts[has], len(h))
  per = max(1, chunk // num_perm)
  lo = 0
  with np.errstate(over="ignore"):
    while lo < len(has):  # Whole texts per chunk, about `per` n-grams.
      hi = int(np.searchsorted(bounds, bounds[lo] + per, side="right")) - 1
      hi = min(max(hi, lo + 1), len(has))
      g0, g1 = bounds[lo], bounds[hi]
      values = a[:, None] * h[None, g0:g1] + b[:, None]  # [num_perm, n-grams], rows contiguous
      sig[has[lo:hi]] = np.minimum.reduceat(values, bounds[lo:hi] - g0, axis=1).T
      lo = hi
  return sig


def signatures(texts: Sequence[str], num_perm: int = BANDS * ROWS, n: int = NGRAM,
               seed: int = 0, chunk: int = 1 << 22) -> np.ndarray:
  """MinHash signatures [len(texts), num_perm] (uint64) of the texts' n-gram sets (`_minhash`);
  empty texts get all-ones rows."""
  h, starts = gram_hashes(texts, n)
  return _minhash(h, starts, num_perm, seed, chunk)


def covered_share(h: np.ndarray, starts: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
  """Per text: the share of its distinct n-gram hashes that are in `vocabulary` (sorted uint64;
  0 for texts without n-grams). Jaccard(A, B) >= t needs |A & B| >= t |A|, so a text whose
  share in the union of the evaluation texts' n-grams is below t has no near-duplicate there:
  an exact, vectorised pre-filter before MinHash."""
  valid = starts >= 0
  counts = np.zeros(len(starts), dtype=np.int64)
  counts[valid] = np.diff(np.append(starts[valid], len(h)))
  owner = np.repeat(np.arange(len(starts)), counts)
  with np.errstate(over="ignore"):  # One key per (text, n-gram): distinct n-grams per text.
    key = _mix(h ^ _mix(owner.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
  _, first = np.unique(key, return_index=True)
  hs, os_ = h[first], owner[first]
  pos = np.searchsorted(vocabulary, hs)
  found = (pos < len(vocabulary)) & (vocabulary[np.minimum(pos, len(vocabulary) - 1)] == hs)
  total = np.bincount(os_, minlength=len(starts))
  inside = np.bincount(os_, weights=found, minlength=len(starts))
  return np.where(total > 0, inside / np.maximum(total, 1), 0.0)


def _band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
  """[len, bands] uint64: one hash of each band's `rows` signature values."""
  keys = np.zeros((len(sig), bands), dtype=np.uint64)
  with np.errstate(over="ignore"):
    for r in range(rows):
      keys = _mix(keys ^ sig[:, r::rows][:, :bands])
  return keys


@dataclasses.dataclass(frozen=True)
class Result:
  """near_duplicates' answer: `drop` (bool per pool document), the candidate pairs checked and
  the number of pool documents with a verified near-duplicate."""

  drop: np.ndarray
  candidate_pairs: int

  @property
  def dropped(self) -> int:
    return int(self.drop.sum())


class Index:
  """The evaluation side of `near_duplicates`, built once: the evaluation texts' n-gram
  vocabulary (for the exact pre-filter), their MinHash band keys (the LSH index) and, lazily,
  their n-gram sets. `find(pool)` may then be called on any number of pool chunks (a streamed
  pool's, `jbat.data.pool_stream`): whether a pool text is dropped depends on that text alone,
  so every chunking and every process gives the same answer for it."""

  def __init__(self, evaluation: Sequence[str], threshold: float = THRESHOLD, n: int = NGRAM,
               bands: int = BANDS, rows: int = ROWS, seed: int = 0):
    self.evaluation = list(evaluation)
    self.threshold, self.n, self.bands, self.rows, self.seed = threshold, n, bands, rows, seed
    ev_h, ev_starts = gram_hashes(self.evaluation, n)
    self.vocabulary = np.unique(ev_h)
    ev_keys = _band_keys(_minhash(ev_h, ev_starts, bands * rows, seed, 1 << 22), bands, rows)
    self.index: list[dict[int, list[int]]] = [dict() for _ in range(bands)]
    for j in np.flatnonzero(ev_starts >= 0):
      for band in range(bands):
        self.index[band].setdefault(int(ev_keys[j, band]), []).append(int(j))
    self.sorted_keys = [np.array(sorted(ix), dtype=np.uint64) for ix in self.index]
    self._sets: dict[int, set] = {}

  @property
  def fingerprint(self) -> str:
    """sha256 (16 hex) of the settings and the evaluation texts: what `find` depends on."""
    h = hashlib.sha256(repr((self.threshold, self.n, self.bands, self.rows, self.seed,
                             len(self.evaluation))).encode())
    for t in self.evaluation:
      h.update(t.encode() + b"\0")
    return h.hexdigest()[:16]

  def find(self, pool: Sequence[str], chunk_docs: int = 200_000) -> Result:
    """Which pool texts are near-duplicates of an evaluation text (see `near_duplicates`)."""
    n, threshold = self.n, self.threshold
    drop = np.zeros(len(pool), dtype=bool)
    n_pairs = 0
    for lo in range(0, len(pool), chunk_docs):
      part = pool[lo:lo + chunk_docs]
      h, starts = gram_hashes(part, n)
      survivors = np.flatnonzero(covered_share(h, starts, self.vocabulary) >= threshold)
      if not len(survivors):
        continue
      sub = [part[i] for i in survivors]
      keys = _band_keys(signatures(sub, self.bands * self.rows, n, self.seed), self.bands,
                        self.rows)
      pairs: dict[int, set] = {}
      for band in range(self.bands):
        for i in np.flatnonzero(np.isin(keys[:, band], self.sorted_keys[band])):
          pairs.setdefault(int(i), set()).update(self.index[band][int(keys[i, band])])
      for i, js in pairs.items():
        mine = shingles(sub[i], n)
        n_pairs += len(js)
        for j in sorted(js):
          if j not in self._sets:
            self._sets[j] = shingles(self.evaluation[j], n)
          if jaccard(mine, self._sets[j]) >= threshold:
            drop[lo + survivors[i]] = True
            break
    return Result(drop=drop, candidate_pairs=n_pairs)


def near_duplicates(pool: Sequence[str], evaluation: Sequence[str], threshold: float = THRESHOLD,
                    n: int = NGRAM, bands: int = BANDS, rows: int = ROWS, seed: int = 0,
                    chunk_docs: int = 200_000) -> Result:
  """Which pool texts are near-duplicates (n-gram Jaccard >= threshold) of an evaluation text.
  Per chunk of `chunk_docs` pool texts (memory stays bounded for millions of documents): the
  exact pre-filter `covered_share` >= threshold, then MinHash + LSH banding of the survivors
  for candidate pairs, then the exact Jaccard of each candidate pair decides (`Index`)."""
  return Index(evaluation, threshold, n, bands, rows, seed).find(pool, chunk_docs)


def brute_force(pool: Sequence[str], evaluation: Sequence[str], threshold: float = THRESHOLD,
                n: int = NGRAM) -> np.ndarray:
  """The exact answer (every pair; for tests): bool per pool text."""
  ev = [shingles(t, n) for t in evaluation]
  return np.array([any(jaccard(shingles(p, n), e) >= threshold for e in ev) for p in pool],
                  dtype=bool)
