"""ALBAT stage 3: threshold, exact sharded top-k, dedup, and the selection manifest.

Order of the pool for one score s (higher is better): by (-s, id), i.e. ties go to the smaller
example id. The selection is

  1. keep rows with s > tau (tau = None: keep all; tau = 0 is the sign condition of docs/method.md
     for `align` / `loss_diff`);
  2. remove duplicates: of rows sharing an example id, then of rows sharing a text hash, keep
     the best-ranked one;
  3. take the first k rows of the order.

It is computed the way a pool spread over many hosts would be: the table is cut into
`shard_count` contiguous shards; dedup winners are reduced across shards (best per id / hash is
associative), then each shard proposes its own top k of the surviving rows and the proposals
are merged and cut to k. Every row of the global top k is in its shard's top k, so the result
is exactly the global one, whatever `shard_count` is.

Rules (`rule=`; all run the same threshold + dedup first, all deterministic given `seed`, and
all return the chosen ids in rank order, i.e. by (-s, id), so `write_manifest` is unchanged):

  topk                    the first k survivors (the default; the description above).
  threshold_uniform       C = the first `top_n` survivors (top_n = 0: all survivors); k drawn
                          uniformly without replacement from C (numpy Generator(seed)).
  threshold_proportional  as above, but drawn with probability proportional to
                          w_i = s_i - min_C s + 0.01 (max_C s - min_C s) + 1e-12 (successive
                          sampling without replacement): the best of C is at most ~101x as
                          likely as the worst; all equal scores give uniform sampling.
  cluster                 k-means (best of 4 k-means++ inits from Generator(seed), Lloyd) of
                          the L2-normalised `features` rows of C into `n_clusters` clusters;
                          then round-robin over the clusters (in the order of their best
                          member), each turn taking the best-scored remaining member, until k.
                          Every non-empty cluster gets one pick before any gets a second.
  round_robin             `per_example[i, j]` = similarity of pool row i to adaptation example
                          j (e.g. LESS cosine of projected gradients, `stream.cosine_matrix`);
                          round-robin over j = 0..M-1, each turn taking j's most similar
                          remaining member of C (ties: better score, then smaller id), until k.
                          No randomness: the seed does not matter.

If C has at most k members, every rule selects all of C (with the fewer-than-k warning when
fewer than k survive).

Outputs (`write_manifest`): `selection/manifest.jsonl` (one record per selected example, in
rank order: id, source, score, rank, and label when the document has one),
`selection/summary.json` (counts, counts per label, score quantiles) and
`selection/score_hist.png` (all pool scores, the selected ones and tau).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jbat import io, layout, registry
from jbat.errors import JbatError
from jbat.scoring.stream import ScoreTable

# The names live in jbat.registry; these aliases keep `selection.RULES` etc. working.
SIGN_SCORES = registry.SIGN_SCORES
RULES = registry.RULES
default_tau = registry.default_tau
resolve_k = registry.resolve_k
KMEANS_ITERS = 20
KMEANS_INITS = 4
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
  rule: str = "topk"
  rule_settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # top_n, seed, ...


@dataclasses.dataclass(frozen=True)
class SelectSpec:
  """One selection as requested: score, size, rule and its settings, and the scoring batches.

  Built once from the config (`from_config`) and handed whole to `albat.select_backbone_data`
  (like `loop.TrainSpec` for training). `request(n_adapt)` is what the selection folder's
  summary.json records: a finished selection is reused only for an equal request.
  """

  score: str  # One of registry.SCORES.
  k: int | str  # Absolute, or "<m>x" times |D_A| (registry.resolve_k).
  tau: float | None | str = "default"  # Keep score > tau; None keeps all; "default": by score.
  rule: str = "topk"  # One of registry.RULES.
  top_n: int = 0  # Threshold rules: choose among the first top_n survivors (0: all).
  n_clusters: int = 8  # Rule "cluster".
  seed: int = 0  # The rule's seed (threshold sampling, k-means).
  feature_dim: int = 64  # Projection size of the gradient features (cluster, round_robin).
  batch_size: int = 32  # Surrogate and scoring batches (global).
  chunk_batches: int = 64  # Scoring batches per chunk file / resume point.
  less_proj_dim: int | None = None  # `less`: project gradients to this many dims.
  less_batch_size: int = 0  # `less`: the pool pass's batch (0: batch_size, which the warm-up uses).

  def __post_init__(self):
    registry.check_score(self.score, "selection.score")
    registry.check_rule(self.rule, "selection.rule")
    registry.resolve_tau(self.tau, self.score)
    if not isinstance(self.top_n, (int, np.integer)) or isinstance(self.top_n, bool) \
        or self.top_n < 0:
      raise JbatError(f"selection.top_n: expected an int >= 0 (0: no cap), got {self.top_n!r}")

  @property
  def needs_features(self) -> bool:
    return self.rule in registry.FEATURE_RULES

  def request(self, n_adapt: int) -> dict[str, Any]:
    """What decides the selected set besides the scores' inputs (k resolved against |D_A|),
    as JSON values: the record a finished selection is compared with."""
    request = {"score": self.score, "k": registry.resolve_k(self.k, n_adapt), "tau": self.tau,
               "rule": self.rule, "top_n": int(self.top_n), "n_clusters": int(self.n_clusters),
               "select_seed": int(self.seed), "feature_dim": int(self.feature_dim)}
    return json.loads(json.dumps(request))

  @classmethod
  def from_config(cls, config: Any, n_pool: int, *, score: str | None = None,
                  seed: int | None = None) -> "SelectSpec":
    """The config's selection (`select.*`): k capped at the pool size, tau parsed; `score`
    defaults to select.score and `seed` (the rule's) to config.seed."""
    s = config.select
    return cls(score=s.score if score is None else score, k=registry.pool_k(s.k, n_pool),
               tau=registry.parse_tau(s.tau), rule=s.rule, top_n=s.top_n,
               n_clusters=s.n_clusters, seed=config.seed if seed is None else seed,
               batch_size=s.batch_size, chunk_batches=s.chunk_batches,
               less_batch_size=s.less_batch_size)


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


def _survivors(table: ScoreTable, score: str, tau: float | None | str,
               ids_to_hash: Mapping[int, str] | Sequence[str] | np.ndarray | None,
               shard_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None, int,
                                          list[np.ndarray]]:
  """Validation, threshold and sharded dedup: (ids, s, survivors bool[N], tau, n_pass, shards)."""
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
  if not isinstance(shard_count, int) or shard_count < 1:
    raise JbatError(f"selection: shard_count must be a positive int, got {shard_count!r}")
  tau = registry.resolve_tau(tau, score)
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
  return ids, s, survivors, tau, n_pass, shards


def _top_rows(ids: np.ndarray, s: np.ndarray, survivors: np.ndarray, shards: list[np.ndarray],
              k: int) -> np.ndarray:
  """Row indices of the first k survivors in rank order: per-shard top k, merged, cut to k."""
  proposals = []
  for shard in shards:
    mine = shard[survivors[shard]]
    proposals.append(mine[_order(s[mine], ids[mine])][:k])
  merged = np.concatenate(proposals)
  return merged[_order(s[merged], ids[merged])][:k]


def candidate_rows(table: ScoreTable, score: str, *, tau: float | None | str = "default",
                   top_n: int = 0,
                   ids_to_hash: Mapping[int, str] | Sequence[str] | np.ndarray | None = None,
                   shard_count: int = 16) -> np.ndarray:
  """Row indices (into table.ids) of C: the first `top_n` rows surviving tau and dedup (top_n
  = 0: all of them), in rank order. What the non-topk rules choose from; callers use it to
  compute features for C only (e.g. `stream.pool_grad_features` on C's examples).
  """
  if not isinstance(top_n, (int, np.integer)) or isinstance(top_n, bool) or top_n < 0:
    raise JbatError(f"selection.top_n: expected an int >= 0 (0: no cap), got {top_n!r}")
  ids, s, survivors, _, _, shards = _survivors(table, score, tau, ids_to_hash, shard_count)
  return _top_rows(ids, s, survivors, shards, int(top_n) or int(survivors.sum()))


def _weighted_sample(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
  """k distinct indices drawn with probability proportional to `weights` (successively)."""
  return rng.choice(weights.size, size=k, replace=False, p=weights / weights.sum())


def _kmeans_once(x: np.ndarray, c: int, rng: np.random.Generator,
                 iters: int) -> tuple[np.ndarray, float]:
  """One k-means++ init + Lloyd run: (labels int64[N], inertia = sum of squared distances)."""
  n = x.shape[0]
  first = int(rng.integers(n))
  chosen = [first]
  d2 = np.sum((x - x[first]) ** 2, axis=1)
  for _ in range(1, c):
    total = d2.sum()
    i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
    chosen.append(i)
    d2 = np.minimum(d2, np.sum((x - x[i]) ** 2, axis=1))
  centres = x[chosen].copy()
  labels = np.full(n, -1, np.int64)
  for _ in range(iters):
    dist = (np.sum(x * x, axis=1)[:, None] - 2 * x @ centres.T
            + np.sum(centres * centres, axis=1)[None, :])
    new = np.argmin(dist, axis=1)
    if np.array_equal(new, labels):
      break
    labels = new
    for j in range(c):
      members = x[labels == j]
      if members.shape[0]:
        centres[j] = members.mean(axis=0)
  inertia = float(np.sum((x - centres[labels]) ** 2))
  return labels, inertia


def kmeans(x: np.ndarray, n_clusters: int, seed: int, iters: int = KMEANS_ITERS,
           n_init: int = KMEANS_INITS) -> np.ndarray:
  """Cluster labels int64[N] of the rows of x [N, d]: `n_init` runs of k-means++ init followed
  by up to `iters` Lloyd steps, all drawing from one Generator(seed); the run with the lowest
  inertia (sum of squared distances to the centres) wins (first run on ties). Empty clusters
  keep their centre. Deterministic given (x, n_clusters, seed); n_clusters is capped at N.
  Cost: n_init * iters * N * n_clusters * d.
  """
  x = np.asarray(x, np.float64)
  c = min(int(n_clusters), x.shape[0])
  rng = np.random.default_rng(seed)
  best, best_inertia = None, np.inf
  for _ in range(max(1, int(n_init))):
    labels, inertia = _kmeans_once(x, c, rng, iters)
    if best is None or inertia < best_inertia - 1e-9 * max(1.0, abs(best_inertia)):
      best, best_inertia = labels, inertia
  return best


def _round_robin(groups: list[np.ndarray], k: int) -> list[int]:
  """Turn by turn over `groups` (each an ordered array of positions), each turn taking the
  group's first position not taken yet, until k are taken or every group is exhausted."""
  taken: set[int] = set()
  out: list[int] = []
  ptr = [0] * len(groups)
  while len(out) < k:
    progressed = False
    for g, order in enumerate(groups):
      while ptr[g] < order.size and int(order[ptr[g]]) in taken:
        ptr[g] += 1
      if ptr[g] < order.size:
        pos = int(order[ptr[g]])
        taken.add(pos)
        out.append(pos)
        progressed = True
        if len(out) == k:
          break
    if not progressed:
      break
  return out


def select(table: ScoreTable, score: str, *, k: int, tau: float | None | str = "default",
           rule: str = "topk", top_n: int = 0, seed: int = 0,
           ids_to_hash: Mapping[int, str] | Sequence[str] | np.ndarray | None = None,
           features: np.ndarray | None = None, per_example: np.ndarray | None = None,
           n_clusters: int = 8, shard_count: int = 16) -> Selection:
  """k pool examples by `score` after the tau threshold and dedup, chosen by `rule`.

  Args:
    table: scores from `score_pool`.
    score: which column to rank by.
    k: how many to select (absolute; use `resolve_k` for multiples of |D_A|).
    tau: keep score > tau; None keeps all; "default" = `default_tau(score)`.
    rule: one of RULES (module docstring). "topk" ignores top_n, seed, features, per_example.
    top_n: the non-topk rules choose among the first top_n survivors (0: all survivors).
    seed: numpy Generator seed of threshold_uniform / threshold_proportional / cluster.
    ids_to_hash: text hash per example (mapping id -> hash, or an array parallel to
      table.ids); None skips text dedup.
    features: float[N, d] parallel to table rows (rule "cluster"; only C's rows are read).
    per_example: float[N, M] parallel to table rows, similarity to each of M adaptation
      examples (rule "round_robin"; only C's rows are read).
    n_clusters: clusters for rule "cluster" (capped at |C|).
    shard_count: number of contiguous shards the top-k runs over (does not change the result).
  Returns:
    Selection (ids and scores in rank order; rule and its settings recorded). If fewer than k
    rows pass tau and dedup, all of them are selected and a warning says how many.
  Raises:
    JbatError: unknown score or rule, empty table, NaN/inf scores (lists ids), k not a
      positive int, k larger than the pool, bad top_n / n_clusters, missing or misshaped
      features / per_example, shard_count < 1.
  """
  registry.check_rule(rule, "selection.rule")
  if not isinstance(top_n, (int, np.integer)) or isinstance(top_n, bool) or top_n < 0:
    raise JbatError(f"selection.top_n: expected an int >= 0 (0: no cap), got {top_n!r}")
  ids, s, survivors, tau, n_pass, shards = _survivors(table, score, tau, ids_to_hash,
                                                      shard_count)
  n = int(ids.shape[0])
  registry.check_k(k, n)
  n_candidates = int(survivors.sum())
  settings: dict[str, Any] = {}
  if rule == "topk":
    chosen = _top_rows(ids, s, survivors, shards, int(k))
  else:
    settings = {"top_n": int(top_n), "seed": int(seed)}
    cand = _top_rows(ids, s, survivors, shards, int(top_n) or n_candidates)
    if rule == "cluster":
      settings["n_clusters"] = int(n_clusters)
      if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
        raise JbatError(f"selection.n_clusters: expected a positive int, got {n_clusters!r}")
    extra = features if rule == "cluster" else per_example if rule == "round_robin" else None
    if rule in ("cluster", "round_robin"):
      what = "features" if rule == "cluster" else "per_example"
      if extra is None:
        raise JbatError(f"selection: rule {rule!r} needs {what} (an array parallel to the "
                        f"table rows)")
      extra = np.asarray(extra)
      if extra.ndim != 2 or extra.shape[0] != n:
        raise JbatError(f"selection: {what} must be [{n}, d] (one row per table row), got "
                        f"{list(extra.shape)}")
      sub = extra[cand].astype(np.float64)
      if not np.isfinite(sub).all():
        raise JbatError(f"selection: non-finite {what} for candidate ids "
                        f"{ids[cand][~np.isfinite(sub).all(axis=1)][:10].tolist()}")
    if cand.size <= k:
      chosen = cand
    elif rule in ("threshold_uniform", "threshold_proportional"):
      rng = np.random.default_rng(seed)
      if rule == "threshold_uniform":
        pick = rng.choice(cand.size, size=int(k), replace=False)
      else:
        sc = s[cand].astype(np.float64)
        w = sc - sc.min() + 0.01 * (sc.max() - sc.min()) + 1e-12
        pick = _weighted_sample(rng, w, int(k))
      chosen = cand[np.sort(pick)]
    elif rule == "cluster":
      norms = np.linalg.norm(sub, axis=1, keepdims=True)
      labels = kmeans(sub / np.where(norms > 0, norms, 1.0), int(n_clusters), int(seed))
      # Positions in C are rank order, so each group is already best-scored first; groups
      # are visited in the order of their best member.
      groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
      groups.sort(key=lambda g: int(g[0]))
      chosen = cand[np.sort(_round_robin(groups, int(k)))]
    else:  # round_robin
      pos = np.arange(cand.size)
      groups = [np.lexsort((pos, -sub[:, j])) for j in range(sub.shape[1])]
      chosen = cand[np.sort(_round_robin(groups, int(k)))]
  if chosen.size < k:
    cap = (f", capped at top_n = {top_n}" if rule != "topk" and 0 < top_n < n_candidates
           else "")
    warnings.warn(f"selection: only {chosen.size} of the requested k = {k} examples pass "
                  f"'{score}' > {tau} and dedup ({n_pass} of {n} pass tau{cap}); selecting "
                  f"{chosen.size}", stacklevel=2)
  return Selection(score=score, tau=tau, k=int(k), ids=ids[chosen], scores=s[chosen],
                   pool_scores=s, n_pool=n, n_pass_tau=n_pass, n_candidates=n_candidates,
                   rule=rule, rule_settings=settings)


# ----------------------------------------------------------------------------- outputs


def _quantiles(x: np.ndarray) -> dict[str, float]:
  if x.size == 0:
    return {}
  q = np.quantile(x.astype(np.float64), QUANTILES)
  return {f"q{int(round(p * 100)):02d}": float(v) for p, v in zip(QUANTILES, q)}


def write_manifest(selection: Selection, docs_by_id: Mapping[int, Any],
                   out_dir: str | pathlib.Path,
                   extra_summary: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes out_dir/selection/{manifest.jsonl, summary.json, score_hist.png}; returns the manifest.

  Manifest records (rank order, sorted keys): {"id", "source", "score", "rank" (1-based),
  "label" (only when the document has one)}, plus the document's `manifest_fields` (a dict)
  when it has them (e.g. the uid, file, row and text of a pool file record). summary.json also
  records "rule" and "rule_settings", plus the keys of `extra_summary` (e.g. albat's
  "request"). `docs_by_id` maps id -> Document (anything with .source and .label). All files
  are written atomically; the manifest is the last one written, so its presence means the
  selection stage finished.
  """
  folder = layout.selection_files(out_dir)
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
    rec.update(getattr(doc, "manifest_fields", None) or {})
    labels[str(label)] = labels.get(str(label), 0) + 1
    lines.append(json.dumps(rec, sort_keys=True) + "\n")
  summary = {
      "score": selection.score, "tau": selection.tau, "k": selection.k,
      "n_pool": selection.n_pool, "n_pass_tau": selection.n_pass_tau,
      "n_candidates": selection.n_candidates, "n_selected": int(selection.ids.size),
      "selected_per_label": dict(sorted(labels.items())),
      "pool_score_quantiles": _quantiles(selection.pool_scores),
      "selected_score_quantiles": _quantiles(selection.scores),
      "rule": selection.rule, "rule_settings": selection.rule_settings,
      **(extra_summary or {}),
  }
  io.write_json_atomic(layout.summary(out_dir), summary)
  _plot_hist(selection, folder / "score_hist.png")
  manifest = layout.manifest(out_dir)
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
