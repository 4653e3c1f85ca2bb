"""ALBAT stage 3: threshold, exact sharded top-k, dedup, and the selection manifest.

Order of the pool for one score s (higher is better): by (-s, id), i.e. ties go to the smaller
example id. The selection is

  1. keep rows with s > tau (tau = None: keep all; tau = 0 is the sign condition of method.md
     for `align` / `loss_diff`);
  2. remove duplicates: of rows sharing an example id, then of rows sharing a text hash, keep
     the best-ranked one;
  3. take the first k rows of the order.

It is computed the way a pool spread over many hosts would be: the table is cut into
`shard_count` contiguous shards; dedup winners are reduced across shards (best per id / hash is
associative), then each shard proposes its own top k of the surviving rows and the proposals
are merged and cut to k. Every row of the global top k is in its shard's top k, so the result
is exactly the global one, whatever `shard_count` is.

Outputs (`write_manifest`): `selection/manifest.jsonl` (one record per selected example, in
rank order: id, source, score, rank, and label when the document has one),
`selection/summary.json` (counts, counts per label, score quantiles) and
`selection/score_hist.png` (all pool scores, the selected ones and tau).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jbat import io
from jbat.errors import JbatError
from jbat.scoring.stream import ScoreTable

# tau used when the caller passes "default": the sign condition for the first-order scores.
SIGN_SCORES = ("align", "loss_diff")
QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


@dataclasses.dataclass(frozen=True)
class Selection:
  """The chosen examples, best first, and what they were chosen from."""

  score: str
  tau: float | None
  k: int  # Requested size.
  ids: np.ndarray  # int64[m], m <= k, rank order.
  scores: np.ndarray  # float32[m].
  pool_scores: np.ndarray  # float32[N]: every score of the table (for the summary/histogram).
  n_pool: int
  n_pass_tau: int  # Rows with score > tau.
  n_candidates: int  # Rows left after tau and dedup.


def default_tau(score: str) -> float | None:
  """0.0 (sign condition) for align / loss_diff, None (no threshold) for every other score."""
  return 0.0 if score in SIGN_SCORES else None


def resolve_k(k: int | str, n_adapt: int) -> int:
  """k as an absolute count: an int > 0, or a string "<m>x" meaning round(m * |D_A|).

  Examples: resolve_k(100, 20) = 100, resolve_k("4x", 20) = 80, resolve_k("0.5x", 20) = 10.
  """
  if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
    if k <= 0:
      raise JbatError(f"selection.k: expected a positive count, got {k}")
    return int(k)
  if isinstance(k, str):
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*x\s*", k)
    if m:
      value = int(round(float(m.group(1)) * n_adapt))
      if value <= 0:
        raise JbatError(f"selection.k: {k!r} times |D_A| = {n_adapt} gives {value} examples")
      return value
  raise JbatError(f"selection.k: expected a positive int or a multiple of |D_A| like '4x', "
                  f"got {k!r}")


def _hash_codes(ids: np.ndarray, ids_to_hash: Mapping[int, str] | Sequence[str] | np.ndarray | None
                ) -> np.ndarray | None:
  """int64[N] codes with equal code iff equal text hash (None: no text dedup)."""
  if ids_to_hash is None:
    return None
  if isinstance(ids_to_hash, Mapping):
    missing = [int(i) for i in ids if int(i) not in ids_to_hash]
    if missing:
      raise JbatError(f"selection: ids_to_hash has no text hash for example ids {missing[:10]}")
    hashes = np.asarray([ids_to_hash[int(i)] for i in ids], dtype=object)
  else:
    hashes = np.asarray(ids_to_hash, dtype=object)
    if hashes.shape != ids.shape:
      raise JbatError(f"selection: ids_to_hash has {hashes.shape[0]} hashes for {ids.shape[0]} "
                      f"table rows (an array must be parallel to table.ids)")
  return np.unique(hashes.astype(str), return_inverse=True)[1].astype(np.int64)


def _order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Indices sorting rows best first: by score descending, then id ascending."""
  return np.lexsort((ids, -scores.astype(np.float64)))


def _best_per_key(rows: np.ndarray, key: np.ndarray, scores: np.ndarray,
                  ids: np.ndarray) -> np.ndarray:
  """Of `rows`, those that are the best-ranked among rows sharing key[row]. Sorted row indices."""
  if rows.size == 0:
    return rows
  ranked = rows[_order(scores[rows], ids[rows])]
  _, first = np.unique(key[ranked], return_index=True)
  return np.sort(ranked[first])


def select(table: ScoreTable, score: str, *, k: int, tau: float | None | str = "default",
           ids_to_hash: Mapping[int, str] | Sequence[str] | np.ndarray | None = None,
           shard_count: int = 16) -> Selection:
  """The top-k pool examples by `score` after the tau threshold and dedup (see module doc).

  Args:
    table: scores from `score_pool`.
    score: which column to rank by.
    k: how many to select (absolute; use `resolve_k` for multiples of |D_A|).
    tau: keep score > tau; None keeps all; "default" = `default_tau(score)`.
    ids_to_hash: text hash per example (mapping id -> hash, or an array parallel to
      table.ids); None skips text dedup.
    shard_count: number of contiguous shards the top-k runs over (does not change the result).
  Returns:
    Selection (ids and scores in rank order). If fewer than k rows pass tau and dedup, all of
    them are selected and a warning says how many.
  Raises:
    JbatError: unknown score, empty table, NaN/inf scores (lists ids), k not a positive int,
      k larger than the pool, shard_count < 1.
  """
  if score not in table.scores:
    raise JbatError(f"selection.score: {score!r} is not in the score table (has "
                    f"{sorted(table.scores)})")
  ids = np.asarray(table.ids, np.int64)
  s = np.asarray(table.scores[score], np.float32)
  n = int(ids.shape[0])
  if n == 0:
    raise JbatError("selection: the score table is empty (the backbone pool had no examples)")
  bad = ~np.isfinite(s)
  if bad.any():
    raise JbatError(f"selection: {int(bad.sum())} non-finite '{score}' scores; first example "
                    f"ids: {ids[bad][:10].tolist()}")
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
    raise JbatError(f"selection.k: expected a positive int (see resolve_k), got {k!r}")
  if k > n:
    raise JbatError(f"selection.k: k = {k} is larger than the backbone pool ({n} examples)")
  if not isinstance(shard_count, int) or shard_count < 1:
    raise JbatError(f"selection: shard_count must be a positive int, got {shard_count!r}")
  tau = default_tau(score) if isinstance(tau, str) and tau == "default" else tau
  if isinstance(tau, str):
    raise JbatError(f"selection.tau: expected a number, None or 'default', got {tau!r}")
  codes = _hash_codes(ids, ids_to_hash)

  shards = np.array_split(np.arange(n), shard_count)
  # 1. Threshold; 2. dedup by id, then by text hash. Each dedup is a two-level reduction (best
  # per key inside each shard, then best of the shard winners), finished over all shards before
  # the next one starts: hash dedup must only see rows that won their id globally.
  rows = [shard if tau is None else shard[s[shard] > tau] for shard in shards]
  n_pass = sum(int(r.size) for r in rows)
  for key in (ids, codes):
    if key is None:
      continue
    winners = _best_per_key(np.concatenate([_best_per_key(r, key, s, ids) for r in rows]),
                            key, s, ids)
    keep = np.zeros(n, bool)
    keep[winners] = True
    rows = [r[keep[r]] for r in rows]
  survivors = np.zeros(n, bool)
  survivors[np.concatenate(rows)] = True
  n_candidates = int(survivors.sum())
  # 3. Per-shard top k of the survivors, then merge the proposals and cut to k.
  proposals = []
  for shard in shards:
    mine = shard[survivors[shard]]
    proposals.append(mine[_order(s[mine], ids[mine])][:k])
  merged = np.concatenate(proposals)
  chosen = merged[_order(s[merged], ids[merged])][:k]
  if chosen.size < k:
    warnings.warn(f"selection: only {chosen.size} of the requested k = {k} examples pass "
                  f"'{score}' > {tau} and dedup ({n_pass} of {n} pass tau); selecting "
                  f"{chosen.size}", stacklevel=2)
  return Selection(score=score, tau=tau, k=int(k), ids=ids[chosen], scores=s[chosen],
                   pool_scores=s, n_pool=n, n_pass_tau=n_pass, n_candidates=n_candidates)


# ----------------------------------------------------------------------------- outputs


def _quantiles(x: np.ndarray) -> dict[str, float]:
  if x.size == 0:
    return {}
  q = np.quantile(x.astype(np.float64), QUANTILES)
  return {f"q{int(round(p * 100)):02d}": float(v) for p, v in zip(QUANTILES, q)}


def write_manifest(selection: Selection, docs_by_id: Mapping[int, Any],
                   out_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes out_dir/selection/{manifest.jsonl, summary.json, score_hist.png}; returns the manifest.

  Manifest records (rank order, sorted keys): {"id", "source", "score", "rank" (1-based),
  "label" (only when the document has one)}. `docs_by_id` maps id -> Document (anything with
  .source and .label). All files are written atomically; the manifest is the last one written,
  so its presence means the selection stage finished.
  """
  folder = pathlib.Path(out_dir) / "selection"
  missing = [int(i) for i in selection.ids if int(i) not in docs_by_id]
  if missing:
    raise JbatError(f"selection: no document for selected ids {missing[:10]}")
  lines, labels = [], {}
  for rank, (i, sc) in enumerate(zip(selection.ids.tolist(), selection.scores.tolist()), 1):
    doc = docs_by_id[i]
    rec = {"id": int(i), "source": doc.source, "score": float(sc), "rank": rank}
    label = getattr(doc, "label", None)
    if label is not None:
      rec["label"] = label
    labels[str(label)] = labels.get(str(label), 0) + 1
    lines.append(json.dumps(rec, sort_keys=True) + "\n")
  summary = {
      "score": selection.score, "tau": selection.tau, "k": selection.k,
      "n_pool": selection.n_pool, "n_pass_tau": selection.n_pass_tau,
      "n_candidates": selection.n_candidates, "n_selected": int(selection.ids.size),
      "selected_per_label": dict(sorted(labels.items())),
      "pool_score_quantiles": _quantiles(selection.pool_scores),
      "selected_score_quantiles": _quantiles(selection.scores),
  }
  io.write_json_atomic(folder / "summary.json", summary)
  _plot_hist(selection, folder / "score_hist.png")
  manifest = folder / "manifest.jsonl"
  io.write_text_atomic(manifest, "".join(lines))
  return manifest


def _plot_hist(selection: Selection, path: pathlib.Path) -> None:
  """Histogram of all pool scores, the selected scores on top, tau as a vertical line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.5))
  bins = np.histogram_bin_edges(selection.pool_scores.astype(np.float64), bins=50)
  ax.hist(selection.pool_scores, bins=bins, color="0.7", label=f"pool ({selection.n_pool})")
  ax.hist(selection.scores, bins=bins, color="C0", label=f"selected ({selection.ids.size})")
  if selection.tau is not None:
    ax.axvline(selection.tau, color="C3", linestyle="--", label=f"tau = {selection.tau:g}")
  ax.set_xlabel(f"{selection.score} score")
  ax.set_ylabel("examples")
  ax.legend(fontsize=8)
  fig.tight_layout()
  with io.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)
