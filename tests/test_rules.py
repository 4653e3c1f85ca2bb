"""Selection rules beyond top-k (jbat.selection) and their wiring in albat (rule change reuses
the stored scores and rewrites the manifest)."""

import json

import numpy as np
import pytest

from jbat import albat, selection
from jbat.errors import JbatError
from jbat.scoring.stream import ScoreTable
from tests import test_stream as T


def _table(n=200, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.permutation(5 * n)[:n].astype(np.int64)
  return ScoreTable(ids=ids, scores={"align": rng.normal(size=n).astype(np.float32)})


def _rank_order(table, chosen_ids):
  s = dict(zip(table.ids.tolist(), table.scores["align"].tolist()))
  return sorted(chosen_ids, key=lambda i: (-s[i], i))


@pytest.mark.parametrize("rule", ["threshold_uniform", "threshold_proportional"])
def test_threshold_rules_seeded_and_within_top_n(rule):
  table = _table()
  top = selection.select(table, "align", k=40, tau=0.0).ids.tolist()  # The 40 best passing.
  runs = {seed: selection.select(table, "align", k=10, tau=0.0, rule=rule, top_n=40, seed=seed)
          for seed in range(6)}
  for seed, sel in runs.items():
    again = selection.select(table, "align", k=10, tau=0.0, rule=rule, top_n=40, seed=seed)
    assert again.ids.tolist() == sel.ids.tolist()  # Deterministic given the seed.
    assert len(set(sel.ids.tolist())) == 10 and set(sel.ids.tolist()) <= set(top)
    assert sel.ids.tolist() == _rank_order(table, sel.ids.tolist())  # Rank order.
    assert (sel.scores > 0).all() and sel.rule == rule
    assert sel.rule_settings == {"top_n": 40, "seed": seed}
  assert len({tuple(s.ids.tolist()) for s in runs.values()}) == len(runs)  # Seeds differ.
  # top_n = 0: every passing example can be drawn (only tau and dedup limit C).
  passing = set(table.ids[table.scores["align"] > 0].tolist())
  picked = set()
  for seed in range(40):
    picked |= set(selection.select(table, "align", k=20, tau=0.0, rule=rule, seed=seed).ids
                  .tolist())
  assert picked <= passing and len(picked) > 40


def test_proportional_prefers_high_scores_and_uniform_does_not():
  table = _table(400, seed=1)
  mean = {}
  for rule in ("threshold_uniform", "threshold_proportional"):
    mean[rule] = np.mean([selection.select(table, "align", k=20, tau=0.0, rule=rule, top_n=150,
                                           seed=s).scores.mean() for s in range(30)])
  cand = np.sort(table.scores["align"])[::-1][:150]
  assert abs(mean["threshold_uniform"] - cand.mean()) < 0.05
  # Linear weights w = s - min + 0.01 (max - min): expected score = sum w s / sum w (k << |C|).
  w = cand - cand.min() + 0.01 * (cand.max() - cand.min())
  assert mean["threshold_proportional"] > mean["threshold_uniform"] + 0.1
  assert abs(mean["threshold_proportional"] - (w * cand).sum() / w.sum()) < 0.1


def test_random_rules_dedup_first():
  ids = np.arange(60, dtype=np.int64)
  s = np.linspace(1, 2, 60).astype(np.float32)
  hashes = [f"h{i // 3}" for i in range(60)]  # Groups of 3 share a text: 20 distinct texts.
  table = ScoreTable(ids=ids, scores={"align": s})
  for seed in range(5):
    sel = selection.select(table, "align", k=10, rule="threshold_uniform", seed=seed,
                           ids_to_hash=hashes)
    # Only the best (highest id: highest score) of each hash group can be chosen.
    assert all(i % 3 == 2 for i in sel.ids.tolist()) and sel.n_candidates == 20


def test_cluster_round_robin_covers_every_cluster_first():
  rng = np.random.default_rng(0)
  sizes = [50, 5, 20, 2]
  centres = np.eye(4, 8) * 10
  feats = np.concatenate([c + 0.3 * rng.normal(size=(m, 8)) for c, m in zip(centres, sizes)])
  blob = np.repeat(np.arange(4), sizes)
  perm = rng.permutation(feats.shape[0])
  feats, blob = feats[perm], blob[perm]
  n = feats.shape[0]
  # Scores: blob 0 holds every top score, so top-k would take blob 0 only.
  s = (blob == 0) * 10.0 + rng.uniform(size=n)
  table = ScoreTable(ids=np.arange(n, dtype=np.int64), scores={"align": s.astype(np.float32)})
  assert set(blob[selection.select(table, "align", k=6).ids]) == {0}
  for seed in range(3):
    sel = selection.select(table, "align", k=4, tau=None, rule="cluster", features=feats,
                           n_clusters=4, seed=seed)
    assert sorted(blob[sel.ids].tolist()) == [0, 1, 2, 3]  # One per cluster.
    for i in sel.ids:  # Each pick is the best-scored member of its cluster.
      assert s[i] == s[blob == blob[i]].max()
    sel6 = selection.select(table, "align", k=6, tau=None, rule="cluster", features=feats,
                            n_clusters=4, seed=seed)
    assert set(sel.ids.tolist()) <= set(sel6.ids.tolist())
    assert sorted(np.bincount(blob[sel6.ids], minlength=4).tolist()) == [1, 1, 2, 2]
  # k-means recovers the blobs (labels up to permutation) and is seed-deterministic.
  labels = selection.kmeans(feats, 4, seed=1)
  assert np.array_equal(labels, selection.kmeans(feats, 4, seed=1))
  assert all(len(set(labels[blob == b])) == 1 for b in range(4))
  with pytest.raises(JbatError, match="needs features"):
    selection.select(table, "align", k=4, rule="cluster")
  with pytest.raises(JbatError, match=r"features must be \[77, d\]"):
    selection.select(table, "align", k=4, rule="cluster", features=feats[:5])


def _brute_round_robin(s, ids, sim, cand_rows, k):
  taken, order = [], list(cand_rows)
  while len(taken) < min(k, len(order)):
    for j in range(sim.shape[1]):
      rest = [r for r in order if r not in taken]
      if not rest or len(taken) == k:
        break
      taken.append(max(rest, key=lambda r: (sim[r, j], s[r], -ids[r])))
  return sorted(ids[taken].tolist(), key=lambda i: (-s[ids == i][0], i))


def test_round_robin_per_adaptation_example():
  rng = np.random.default_rng(3)
  n, m = 120, 7
  table = _table(n, seed=3)
  s, ids = table.scores["align"], table.ids
  sim = rng.normal(size=(n, m)).astype(np.float32)
  sim[5, :] = 9.0  # Row 5 is everyone's favourite: it must be taken once, then skipped.
  cand = selection.candidate_rows(table, "align", tau=None, top_n=60)
  sel = selection.select(table, "align", k=m, tau=None, rule="round_robin", top_n=60,
                         per_example=sim)
  # Every adaptation example's best candidate is selected (k = M).
  best = {int(ids[cand[np.argmax(sim[cand, j])]]) for j in range(m)}
  assert best <= set(sel.ids.tolist())
  for k in (m, 2 * m + 3, 60):
    got = selection.select(table, "align", k=k, tau=None, rule="round_robin", top_n=60,
                           per_example=sim, seed=k).ids.tolist()
    assert got == _brute_round_robin(s, ids, sim, cand.tolist(), k)


def test_bad_rule_and_top_n():
  table = _table(20)
  with pytest.raises(JbatError, match="selection.rule"):
    selection.select(table, "align", k=2, rule="best")
  with pytest.raises(JbatError, match="selection.top_n"):
    selection.select(table, "align", k=2, rule="threshold_uniform", top_n=-1)


# ----------------------------------------------------------------------------- albat wiring


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("rules")
  task = T.make_task()
  tok = T.make_tokenizer(task, root / "tok.json")
  return dict(root=root, task=task, tok=tok, base=T.make_base(len(tok)))


def _run(tiny, workdir, **kw):
  if "select_seed" in kw:
    kw["seed"] = kw.pop("select_seed")
  spec = selection.SelectSpec(k="2x", batch_size=8, chunk_batches=2, **kw)
  return albat.select_backbone_data(
      tiny["base"], T.LORA, tiny["task"], tiny["tok"], spec, surrogate_spec=T.SPEC,
      max_len=T.MAX_LEN, seed=0, workdir=workdir, progress=False)


def test_rule_change_reuses_scores_and_rewrites_manifest(tiny):
  work = tiny["root"] / "w"
  path = _run(tiny, work, score="rel_loss_diff")
  first = path.read_text()
  stamps = {p: p.stat().st_mtime_ns for p in (work / "scores").glob("chunk_*.npz")}
  stamps[work / "surrogate" / "phi_s.safetensors"] = (
      work / "surrogate" / "phi_s.safetensors").stat().st_mtime_ns
  assert len(stamps) > 2
  summaries = {}
  for rule in ("threshold_uniform", "cluster", "round_robin"):
    _run(tiny, work, score="rel_loss_diff", rule=rule, top_n=30, n_clusters=3, select_seed=1,
         feature_dim=8)
    summary = json.loads((work / "selection" / "summary.json").read_text())
    assert summary["rule"] == rule and summary["request"]["rule"] == rule
    assert summary["rule_settings"]["top_n"] == 30 and summary["n_selected"] == 12
    summaries[rule] = [json.loads(line)["id"] for line in path.read_text().splitlines()]
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # Nothing rescored / retrained.
  assert summaries["threshold_uniform"] != [json.loads(x)["id"] for x in first.splitlines()]
  # Same request again: the manifest is returned as is (not rewritten).
  mtime = path.stat().st_mtime_ns
  _run(tiny, work, score="rel_loss_diff", rule="round_robin", top_n=30, n_clusters=3,
       select_seed=1, feature_dim=8)
  assert path.stat().st_mtime_ns == mtime
  # Back to top-k: the same manifest as the first run.
  assert _run(tiny, work, score="rel_loss_diff").read_text() == first


def test_contrast_trains_control_on_random_pool_docs(tiny):
  work = tiny["root"] / "c"
  path = _run(tiny, work, score="contrast")
  assert (work / "control" / "phi_s.safetensors").exists()
  picks = albat.control_indices(len(tiny["task"].pool), len(tiny["task"].adapt), 0)
  assert picks == albat.control_indices(len(tiny["task"].pool), len(tiny["task"].adapt), 0)
  assert len(set(picks)) == len(tiny["task"].adapt)
  assert picks != albat.control_indices(len(tiny["task"].pool), len(tiny["task"].adapt), 1)
  recs = [json.loads(line) for line in path.read_text().splitlines()]
  assert len(recs) == 12 and [r["rank"] for r in recs] == list(range(1, 13))
