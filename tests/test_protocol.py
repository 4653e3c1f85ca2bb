"""The evaluation protocol (jbat.protocol, experiment.run): the test split is sealed until the
final evaluation, every step is chosen on validation, and the matched oracle re-draws when
albat re-selects (same number of distinct documents)."""

import json
import pathlib

import numpy as np
import pytest

from jbat import config as config_lib, experiment, protocol
from jbat.data import pipeline, sources
from tests import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def corpus_config(path, d):
  """configs/demo.py:tiny on the labelled JSONL corpus at `path` (target domain "space", 8
  adaptation and 16 held-out documents), workdir and cache under `d`."""
  c = config_lib.load_config_file(ROOT / "configs" / "demo.py", "tiny")
  c.cache_dir, c.workdir, c.progress = str(d / "cache"), str(d / "run"), False
  c.data.source, c.data.path = "jsonl", str(path)
  c.data.label_field, c.data.domain = "domain", "space"
  c.data.n_adapt, c.data.n_heldout = 8, 16
  return c


def test_sealed_split_raises_outside_open_and_counts_reads():
  test = protocol.Sealed([{"input_ids": [1, 2]}, {"input_ids": [3]}])
  assert len(test) == 2  # A count chooses nothing.
  with pytest.raises(protocol.TestSplitRead):
    list(test)
  with pytest.raises(protocol.TestSplitRead):
    test[0]
  with pytest.raises(protocol.TestSplitRead):  # The evaluation's batcher is guarded too.
    next(iter(pipeline.eval_batches(test, 2, 8, 0)))
  with test.open() as examples:
    assert examples[1] == {"input_ids": [3]}
  assert test.reads == 1
  with pytest.raises(protocol.TestSplitRead):  # Sealed again after the block.
    test[1]


@pytest.fixture(scope="module")
def matched_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("protocol")
  rows = synthetic.documents(60)
  # Near-copies of 10 target documents in another domain: those of the copied documents that
  # land in the adaptation / validation / test splits must leave the pool.
  planted = [{"text": "RT @someone: " + r["text"].upper() + " http://t.co/x", "domain": "music"}
             for r in rows if r["domain"] == "space"][:10]
  path = d / "corpus.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows + planted))
  c = corpus_config(path, d)
  c.arms, c.seeds = "none,oracle,albat", "0,1"
  c.bat.reselect_every = 5
  config_lib.validate(c)
  return experiment.run(c), d / "run", path, planted


def test_test_split_read_once_per_arm_and_seed_after_training(matched_run):
  """The run above trains, selects (surrogate, scores, re-selection) and chooses best steps with
  the test split sealed: any read before the final evaluation raises TestSplitRead and the run
  fails. It is opened exactly once per arm and seed."""
  res = matched_run[0]
  assert res["test_reads"] == len(res["arms"]) * len(res["seeds"])
  assert res["protocol"]["best_step_chosen_on"] == "valid"
  for a in res["arms"].values():
    for curve, best, step in zip(a["curves"], a["best_nll"], a["best_step"]):
      assert best == min(v for _, v in curve) and dict(curve)[step] == best
    assert len(a["test_nll_best"]) == 2 and a["test_nll_best"] != a["best_nll"]


def test_matched_oracle_sees_as_many_distinct_documents_as_albat(matched_run):
  res, workdir = matched_run[:2]
  albat, oracle, none = (res["arms"][k] for k in ("albat", "oracle", "none"))
  assert res["matched_oracle"] == "albat"
  assert none["distinct_docs"] == [0, 0]
  assert all(n > 16 for n in albat["distinct_docs"])  # The re-selection brought new documents.
  assert oracle["distinct_docs"] == albat["distinct_docs"]
  for a_seed, o_seed in zip(albat["reselections"], oracle["reselections"]):
    assert [r["step"] for r in a_seed] == [r["step"] for r in o_seed] == [5]
    assert [r["overlap"] for r in a_seed] == pytest.approx([r["overlap"] for r in o_seed])
    assert all(r["precision"] == 1.0 for r in o_seed)  # Still the target's documents.
  row = next(r for r in (workdir / "report.md").read_text().splitlines()
             if r.startswith("| oracle |"))
  assert f"| {np.mean(oracle['distinct_docs']):.0f} |" in row


def test_near_duplicates_of_evaluation_documents_leave_the_pool(matched_run):
  res, workdir, path, planted = matched_run
  docs = sources.load_jsonl(path, label_field="domain")
  task, test = sources.split_task(docs, "space", 8, 8, 8, seed=0)
  evaluation = {d.text.upper() for d in (*task.adapt, *task.heldout, *test)}
  expected = sum(p["text"].split(": ", 1)[1][:-len(" http://t.co/x")] in evaluation
                 for p in planted)
  assert 0 < expected < len(planted)  # Some copies of pool documents stay (not evaluation).
  assert res["near_dup"]["dropped"] == expected and res["near_dup"]["threshold"] == 0.6
  assert res["n_pool"] == len(task.pool) - expected
  assert f"{expected} pool documents dropped as near-duplicates" in (
      workdir / "report.md").read_text().replace("\n", " ")


def test_split_and_draw_seeds_pair_arms_over_all_replicates(tmp_path):
  """split_seeds x draw_seeds x seeds pairs: every arm has one number per pair in the same
  order; another split moves the target documents (other test numbers), both splits share one
  backbone pretrained on neither split's target documents; another draw changes random's documents; the intervals run over all pairs."""
  path = synthetic.write_jsonl(tmp_path / "corpus.jsonl", 60)
  c = corpus_config(path, tmp_path)
  c.arms, c.seeds, c.split_seeds, c.draw_seeds = "none,random", "0", "0,1", "3,4"
  c.train.steps = c.train.eval_every = c.train.ckpt_every = 4
  config_lib.validate(c)
  res = experiment.run(c)
  assert res["pairs"] == [[0, 3, 0], [0, 4, 0], [1, 3, 0], [1, 4, 0]]
  assert res["test_reads"] == 2 * 4
  none, random = res["arms"]["none"], res["arms"]["random"]
  assert len(none["test_nll_best"]) == len(random["test_nll_best"]) == 4
  # `none` does not depend on the draw, only on the split.
  assert none["test_nll_best"][0] == none["test_nll_best"][1]
  assert none["test_nll_best"][0] != none["test_nll_best"][2]
  assert random["test_nll_best"][0] != random["test_nll_best"][1]  # Another draw.
  diff = res["stats"]["random"]["test_nll_best_vs_none"]
  assert diff["n"] == 4 and diff["mean"] == pytest.approx(
      np.mean(np.subtract(random["test_nll_best"], none["test_nll_best"])))
  # One backbone for both splits, pretrained on no target document of either split.
  assert len(set(res["backbone_dir_per_split"])) == 1
  docs = sources.load_jsonl(path, label_field="domain")
  shared = experiment.shared_pretrain_pool(c, docs, [0, 1])
  target = set()
  for split in (0, 1):
    task, test = sources.split_task(docs, "space", 8, 8, 8, seed=split)
    target |= {d.id for d in (*task.adapt, *task.heldout, *test)}
  assert not target & {d.id for d in shared}
  assert 16 < len(target) <= 48 and res["n_pretrain_pool"] == len(shared)
  # A run of split 0 alone, told to exclude both splits, loads that backbone from the cache
  # and gets split 0's `none` numbers bitwise.
  c.arms, c.split_seeds, c.draw_seeds, c.data.backbone_splits = "none", "0", "", "0,1"
  c.workdir = str(tmp_path / "run_split0")
  one = experiment.run(c)
  assert one["backbone_cached"] and one["backbone_dir"] == res["backbone_dir"]
  assert one["arms"]["none"]["test_nll_best"] == none["test_nll_best"][:1]
  for split in (0, 1):
    for draw in (3, 4):
      assert (tmp_path / "run" / f"split_{split}" / f"draw_{draw}" / "arms" / "random"
              / "seed_0" / "adapter.safetensors").exists()


def test_early_stopping_in_every_replicate(tmp_path):
  """train.patience inside the split x draw loop: with lr 1e-30 (no update survives float32
  rounding) the validation NLL never improves after step 0, so every adapter of every
  replicate stops after `patience` evaluations; the arm's early_stopping holds one stopped
  step per pair and report.md lists them all."""
  path = synthetic.write_jsonl(tmp_path / "corpus.jsonl", 60)
  c = corpus_config(path, tmp_path)
  c.arms, c.seeds, c.draw_seeds = "none", "0,1", "3,4"
  c.train.steps, c.train.eval_every, c.train.ckpt_every = 12, 1, 12
  c.train.lr, c.train.patience = 1e-30, 2
  config_lib.validate(c)
  res = experiment.run(c)
  none = res["arms"]["none"]
  assert res["pairs"] == [[0, 3, 0], [0, 3, 1], [0, 4, 0], [0, 4, 1]]
  assert none["early_stopping"] == {"patience": 2, "chosen_on": "valid",
                                    "stopped_step": [2, 2, 2, 2]}
  assert none["best_step"] == [0, 0, 0, 0] and len(none["test_nll_best"]) == 4
  report_md = (tmp_path / "run" / "report.md").read_text()
  assert "## Early stopping" in report_md and "- none: 2, 2, 2, 2 (patience 2" in report_md


def test_split_task_adds_validation_without_moving_adapt_or_test():
  docs = [sources.Document(id=i, text=f"doc {i}", source="s", label="ab"[i % 2])
          for i in range(60)]
  old = sources.make_task(docs, "a", 4, 6, seed=3)
  task, test = sources.split_task(docs, "a", 4, 5, 6, seed=3)
  assert task.adapt == old.adapt and test == old.heldout  # Same documents as before.
  ids = [{d.id for d in x} for x in (task.adapt, task.heldout, test, task.pool)]
  assert len(ids[1]) == 5 and sum(map(len, ids)) == 60 and len(set().union(*ids)) == 60
  assert not ids[1] & {d.id for d in old.heldout} and ids[1] <= {d.id for d in old.pool}


def test_own_path_pool_records_near_duplicates_dropped_as_the_pool_streams(tmp_path):
  """Your own files: pool records that are near-copies of an adapt / valid / test example
  leave the backbone's pretraining pool (in memory) and the streamed pool (the split's index
  in the FilePool read path, counted); far ones stay."""
  from jbat.data import pool_stream
  from jbat.data.tokenizer import train_bpe_tokenizer
  rows = lambda texts: "".join(json.dumps({"text": t}) + "\n" for t in texts)  # noqa: E731
  adapt = [f"adaptation example number {i} about rockets and orbits" for i in range(6)]
  valid = ["a validation sentence on comets and telescopes"]
  test = ["the test sentence: gravity pulls the moon around the planet"]
  pool = ["VIDEO: " + adapt[2].upper() + "!", "RT @x: the test sentence - gravity pulls the "
          "moon around the planet", "bake the bread with flour and butter",
          "A validation sentence on comets and telescopes.", "guitar chords and melody"]
  for name, texts in (("adapt", adapt), ("valid", valid), ("test", test), ("pool", pool)):
    (tmp_path / f"{name}.jsonl").write_text(rows(texts))
  c = config_lib.base_config()
  for name in ("adapt", "valid", "test", "pool"):
    c.data[name] = str(tmp_path / f"{name}.jsonl")
  task, recs = experiment.load_own_task(c)
  task, index, pretrain, near = experiment.filter_near_duplicates(
      c, task, [], recs, experiment.pool_documents(c))
  assert near["streamed"] and near["dropped"] == 3 and near["pool_before"] == 5
  assert [d.text for d in pretrain] == [pool[2], pool[4]]
  tok = train_bpe_tokenizer(adapt + valid + test + pool, 300, tmp_path / "tok.json")
  _, own = experiment.encode_own_task(c, task, recs, tok, near_dup=index)
  counts = pool_stream.PoolCounts()
  assert [ex["text"] for ex in own.pool.local_examples(counts=counts)] == [pool[2], pool[4]]
  assert counts.near_duplicate == 3 and counts.read == 5


def test_dropping_compiled_programs_between_arms_changes_no_number(matched_run, monkeypatch):
  """A big backbone drops jax's compiled programs after each selection, re-selection and arm
  (experiment.release_compiled, to bound a real model's memory); forced on for the tiny model
  here, the rerun of the matched run gives bitwise the same numbers for every arm."""
  import jax
  res, _, path, _ = matched_run
  calls = []
  clear = jax.clear_caches
  monkeypatch.setattr(jax, "clear_caches", lambda: (calls.append(1), clear()))
  monkeypatch.setattr(experiment, "RELEASE_COMPILED_MIN_PARAMS", 0)
  d = path.parent
  c = corpus_config(path, d)
  c.arms, c.seeds, c.workdir = "none,oracle,albat", "0,1", str(d / "run_release")
  c.bat.reselect_every = 5
  again = experiment.run(c)
  # After each arm's selection and each arm (3 + 3), and after albat's re-selection at step 5
  # of each of its 2 seeds.
  assert len(calls) == 3 + 3 + 2
  for arm in ("none", "oracle", "albat"):
    for key in ("best_nll", "test_nll_best", "best_step"):
      assert again["arms"][arm][key] == res["arms"][arm][key], (arm, key)
