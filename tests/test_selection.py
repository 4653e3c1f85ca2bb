"""Selection: exact sharded top-k (vs brute force), ties, dedup, k, tau, manifest files."""

import json
import warnings

import numpy as np
import pytest

from jbat import selection
from jbat.data.sources import Document
from jbat.errors import JbatError
from jbat.scoring.stream import ScoreTable


def brute(ids, s, k, tau, hashes=None):
  """Global sort by (-score, id), drop failing tau, drop later duplicates of id / hash."""
  order = sorted(range(len(ids)), key=lambda i: (-float(s[i]), int(ids[i])))
  seen_id, seen_h, out = set(), set(), []
  for i in order:
    if tau is not None and not s[i] > tau:
      continue
    if ids[i] in seen_id:
      continue
    seen_id.add(ids[i])
    if hashes is not None:
      if hashes[i] in seen_h:
        continue
      seen_h.add(hashes[i])
    out.append(i)
  return [int(ids[i]) for i in out[:k]]


@pytest.mark.parametrize("seed", range(25))
def test_sharded_topk_is_exact_and_shard_independent(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 300))
  ids = rng.permutation(10 * n)[:n].astype(np.int64)
  if seed % 3 == 0:
    ids[rng.integers(0, n, n // 5)] = ids[0]  # Repeated ids.
  s = rng.integers(-5, 6, n).astype(np.float32) / 2  # Many exact ties.
  hashes = [f"h{x}" for x in rng.integers(0, max(1, n // 2), n)] if seed % 2 else None
  k = int(rng.integers(1, n + 1))
  tau = [None, 0.0, -1.0][seed % 3]
  want = brute(ids, s, k, tau, hashes)
  table = ScoreTable(ids=ids, scores={"align": s})
  results = []
  for shards in (1, 2, 3, 7, 64, 1000):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      sel = selection.select(table, "align", k=k, tau=tau, ids_to_hash=hashes,
                             shard_count=shards)
    results.append(sel.ids.tolist())
    np.testing.assert_array_equal(sel.scores, [s[ids == i].max() for i in sel.ids])
  assert all(r == want for r in results), (want, results)


def test_dedup_by_text_hash_keeps_better_ranked():
  ids = np.array([5, 3, 9, 1], np.int64)
  s = np.array([1.0, 2.0, 2.0, 0.5], np.float32)
  table = ScoreTable(ids=ids, scores={"loss_diff": s})
  h = {5: "x", 3: "y", 9: "y", 1: "x"}
  sel = selection.select(table, "loss_diff", k=2, ids_to_hash=h)
  assert sel.ids.tolist() == [3, 5]  # 9 ties with 3 on score, loses on id; 1 duplicates 5.
  assert sel.n_candidates == 2


def test_default_tau_and_fewer_than_k_warns():
  table = ScoreTable(ids=np.arange(6, dtype=np.int64),
                     scores={"align": np.array([-1, 0, 2, 3, -2, 1], np.float32),
                             "random": np.array([.1, .2, .3, .4, .5, .6], np.float32)})
  with pytest.warns(UserWarning, match="only 3 of the requested k = 5"):
    sel = selection.select(table, "align", k=5)
  assert sel.ids.tolist() == [3, 2, 5] and sel.tau == 0.0 and sel.n_pass_tau == 3
  assert selection.select(table, "random", k=6).ids.tolist() == [5, 4, 3, 2, 1, 0]


def test_resolve_k():
  assert selection.resolve_k(7, 20) == 7
  assert selection.resolve_k("4x", 20) == 80
  assert selection.resolve_k("0.5x", 20) == 10
  for bad in (0, -1, "x", "4", 2.5, True):
    with pytest.raises(JbatError, match="selection.k"):
      selection.resolve_k(bad, 20)


def test_bad_inputs():
  table = ScoreTable(ids=np.arange(4, dtype=np.int64),
                     scores={"align": np.array([1, np.nan, 2, np.nan], np.float32)})
  with pytest.raises(JbatError, match=r"non-finite 'align' scores; first example ids: \[1, 3\]"):
    selection.select(table, "align", k=1)
  ok = ScoreTable(ids=np.arange(4, dtype=np.int64), scores={"align": np.ones(4, np.float32)})
  with pytest.raises(JbatError, match=r"k = 5 is larger than the backbone pool \(4 examples\)"):
    selection.select(ok, "align", k=5)
  with pytest.raises(JbatError, match="not in the score table"):
    selection.select(ok, "cosine", k=1)
  empty = ScoreTable(ids=np.zeros(0, np.int64), scores={"align": np.zeros(0, np.float32)})
  with pytest.raises(JbatError, match="empty"):
    selection.select(empty, "align", k=1)


def test_write_manifest(tmp_path):
  ids = np.array([10, 11, 12, 13], np.int64)
  table = ScoreTable(ids=ids, scores={"align": np.array([0.5, -1, 2, 0.25], np.float32)})
  docs = {10: Document(10, "a", "pool.jsonl", "space"), 11: Document(11, "b", "pool.jsonl"),
          12: Document(12, "c", "pool.jsonl", "music"), 13: Document(13, "d", "pool.jsonl")}
  sel = selection.select(table, "align", k=3, shard_count=2)
  path = selection.write_manifest(sel, docs, tmp_path)
  assert path == tmp_path / "selection" / "manifest.jsonl"
  recs = [json.loads(line) for line in path.read_text().splitlines()]
  assert recs == [{"id": 12, "source": "pool.jsonl", "score": 2.0, "rank": 1, "label": "music"},
                  {"id": 10, "source": "pool.jsonl", "score": 0.5, "rank": 2, "label": "space"},
                  {"id": 13, "source": "pool.jsonl", "score": 0.25, "rank": 3}]
  summary = json.loads((tmp_path / "selection" / "summary.json").read_text())
  assert summary["selected_per_label"] == {"None": 1, "music": 1, "space": 1}
  assert summary["n_pass_tau"] == 3 and summary["pool_score_quantiles"]["q100"] == 2.0
  assert (tmp_path / "selection" / "score_hist.png").read_bytes()[:4] == b"\x89PNG"
  first = path.read_bytes()
  selection.write_manifest(selection.select(table, "align", k=3, shard_count=3), docs, tmp_path)
  assert path.read_bytes() == first
