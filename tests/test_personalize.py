"""The personalization experiment end to end at toy size (digits), through the CLI."""

import json
import pathlib
import re

import ml_collections
import numpy as np
import pytest

from jbat import train
from jbat.data import images
from jbat.diffusion import personalize
from jbat.errors import JbatError
from jbat.scoring import stream

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/personalize_demo.py")


def _main(argv):
  """jbat.train.main(argv) in this process (main defines fresh flags from argv per call)."""
  return train.main(list(argv))


def _args(tmp, *extra):
  return ["jbat.train", "--config", CONFIG + ":tiny", f"--config.workdir={tmp / 'wd'}",
          f"--config.cache_dir={tmp / 'cache'}", *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("personalize")
  assert _main(_args(tmp)) == 0
  wd = tmp / "wd"
  return tmp, wd, json.loads((wd / "results.json").read_text())


def _tiny_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("personalize_demo", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("tiny")


def test_every_arm_ran_the_same_steps_and_seeds(tiny_run):
  _, wd, res = tiny_run
  cfg = _tiny_config()
  assert res["arms"] == ["none", "prior", "random", "albat"]
  assert res["seeds"] == [0, 1]
  subjects = [s["name"] for s in res["task"]["subjects"]]
  assert subjects == ["7-0", "7-1"]  # the two largest clusters of class 7
  assert res["units"] == [f"{n}/{s}" for n in subjects for s in res["seeds"]]
  for arm in res["arms"]:
    for unit in res["units"]:
      name, seed = unit.split("/")
      r = res["runs"][arm][unit]
      assert r["steps"] == cfg.train.steps and r["subject"] == name
      metrics = [json.loads(line) for line in
                 (wd / "subjects" / name / "arms" / arm / f"seed_{seed}" / "fit" /
                  "metrics.jsonl").read_text().splitlines()]
      assert max(m["step"] for m in metrics) == cfg.train.steps
      for m in personalize.METRICS:
        assert np.isfinite(r[m])
      for m in ("prompt_fid", "class_pres"):
        assert 0.0 <= r[m] <= 1.0
      assert -1.0 <= r["subject_fid"] <= 1.0 and r["diversity"] >= 0 and r["frechet"] >= -1e-9
      # drift is after - before, with "before" the backbone's loss on the same draws.
      before = res["backbone_runs"][name]["drift_loss"]
      assert abs(r["drift"] - (r["drift_loss"] - before)) < 1e-9
  # Pool arms picked aug.k distinct pool images; seeds give different random picks.
  for arm in ("random", "albat"):
    for unit in res["units"]:
      ids = res["runs"][arm][unit]["aug_ids"]
      assert len(ids) == len(set(ids)) == cfg.aug.k
  assert res["runs"]["random"]["7-0/0"]["aug_ids"] != res["runs"]["random"]["7-0/1"]["aug_ids"]
  assert res["runs"]["none"]["7-0/0"]["aug_ids"] is None
  # The backbone's per-class table covers every class.
  acc = res["backbone"]["class_accuracy"]
  assert len(acc) == 10 and all(0.0 <= v <= 1.0 for v in acc.values())
  assert abs(res["backbone"]["mean_class_accuracy"] - np.mean(list(acc.values()))) < 1e-12


def test_albat_picks_follow_the_scores(tiny_run):
  _, wd, res = tiny_run
  cfg = _tiny_config()
  tmp = wd.parent
  data = images.load_digits()
  task = personalize.make_task(data, cfg)
  for sub in task.subjects:
    # Scored by the shared stream (stream.score_pool): chunks in the score cache, by content.
    folder = stream.scores_dir(wd / "subjects" / sub.name / "albat" / "scores")
    assert folder.parent == tmp / "cache" / "diffusion" / "scores"
    table = stream.load_table(folder, [cfg.score.name])
    scores = table.scores[cfg.score.name]
    np.testing.assert_array_equal(table.ids, task.pool_ids)
    assert scores.shape == (len(task.pool_ids),)
    rank = {int(i): r for r, i in enumerate(task.pool_ids[np.lexsort((task.pool_ids, -scores))])}
    for seed in res["seeds"]:
      run = res["runs"]["albat"][f"{sub.name}/{seed}"]
      ids = run["aug_ids"]
      # threshold_uniform: every pick passed tau = 0 and lies in the top_n.
      pos = np.searchsorted(task.pool_ids, ids)
      assert np.all(scores[pos] > 0)
      assert all(rank[int(i)] < cfg.select.top_n for i in ids)
      prec = float(np.mean(data.train_y[np.asarray(ids)] == sub.cls))
      assert prec == run["aug_precision"]


def test_report_numbers_equal_results_json(tiny_run):
  _, wd, res = tiny_run
  report = (wd / "report.md").read_text()
  lines = report.splitlines()
  head = [i for i, line in enumerate(lines) if line.startswith("| arm | subject fidelity")][0]
  start = head + 2
  end = lines.index("", start)
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in lines[start:end]}
  summary = res["summary"]
  for arm, metrics in list(summary["arms"].items()) + [("backbone (before)",
                                                         summary["backbone"])]:
    cells = rows[arm]
    for cell, m in zip(cells, personalize.METRICS):
      vals = metrics[m]
      want = (f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}")
      assert cell == want, (arm, m, cell, want)
      # ... and the per-unit values are the runs' numbers.
      if arm in res["runs"]:
        assert vals == [res["runs"][arm][u][m] for u in res["units"]]
  paired_lines = [line for line in report.splitlines() if re.match(r"\| \w+ \| \w+ \| [+-]", line)]
  assert len(paired_lines) == sum(len(v) for v in summary["paired"].values())
  refs = {**summary["arms"], "backbone": summary["backbone"]}
  for line in paired_lines:
    arm, ref, *cells = [c.strip() for c in line.split("|")[1:-1]]
    for cell, m in zip(cells, personalize.METRICS):
      st = summary["paired"][arm][ref][m]
      diffs = [a - b for a, b in zip(summary["arms"][arm][m], refs[ref][m])]
      assert abs(st["mean"] - np.mean(diffs)) < 1e-12
      assert cell.startswith(f"{st['mean']:+.4f} [{st['lo']:+.4f}, {st['hi']:+.4f}]")
  b = res["backbone"]
  assert " | ".join(f"{v:.2f}" for v in b["class_accuracy"].values()) in report


def test_grids_exist_and_are_pngs(tiny_run):
  _, wd, res = tiny_run
  import matplotlib.image
  subjects = [s["name"] for s in res["task"]["subjects"]]
  for name in subjects + ["backbone"]:
    path = wd / "grids" / f"{name}.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 8 and img.shape[1] > 8
    assert f"grids/{name}.png" in (wd / "report.md").read_text()
  # A subject's grid: one row of real images, then one row per arm (8x8 images, 1-px
  # borders, upscaled 4x), as many columns as samples.
  n_samples = _tiny_config().eval.n_samples
  img = matplotlib.image.imread(wd / "grids" / f"{subjects[0]}.png")
  assert img.shape[:2] == (4 * ((1 + len(res["arms"])) * 9 + 1), 4 * (n_samples * 9 + 1))


def test_rerun_skips_finished_runs_and_a_lost_result_is_recomputed_identically(tiny_run):
  tmp, wd, res = tiny_run
  lost = wd / "subjects" / "7-1" / "arms" / "albat" / "seed_1" / "result.json"
  before = json.loads(lost.read_text())
  lost.unlink()
  assert _main(_args(tmp)) == 0
  again = json.loads((wd / "results.json").read_text())
  for k in personalize.METRICS + ("aug_ids",):
    assert again["runs"]["albat"]["7-1/1"][k] == before[k]
  assert again["summary"] == res["summary"]
  assert again["backbone"]["cached"] is True


@pytest.mark.parametrize("key, arm, words", [
    ("surrogate.lr", "albat", ("arm albat (surrogate seed 0)", "surrogate training diverged at step")),
    ("train.lr", "none", ("arm none seed 0", "adapter training diverged at step"))])
def test_divergence_exits_2_naming_the_arm_seed_and_lr_key(tiny_run, capsys, key, arm, words):
  tmp, _, _ = tiny_run  # Same cache: the backbone and classifier are loaded, not trained.
  argv = _args(tmp, f"--config.{key}=1e6", f"--config.arms={arm}", "--config.seeds=0")
  argv[3] = f"--config.workdir={tmp / ('wd_diverged_' + arm)}"
  assert _main(argv) == 2
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("jbat: error:")]
  assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
  for word in words + (f"{key}=1e+06 is too high",):
    assert word in errors[0], (word, errors[0])
  assert not (tmp / f"wd_diverged_{arm}" / "results.json").exists()


def test_bad_config_exits_2_and_names_the_field(tmp_path, capsys):
  assert _main(_args(tmp_path, "--config.train.steps=0")) == 2
  assert "train.steps" in capsys.readouterr().err
  assert _main(_args(tmp_path, "--config.arms=none,dsir")) == 2
  assert "arms: dsir" in capsys.readouterr().err
  assert _main(_args(tmp_path, "--config.arms=none,bogus")) == 2
  assert "arms" in capsys.readouterr().err
  assert _main(_args(tmp_path, "--config.select.rule=best")) == 2
  assert "select.rule" in capsys.readouterr().err
  assert not (tmp_path / "wd").exists()  # nothing written for a bad config


def test_validate_unknown_key_and_types():
  c = _tiny_config()
  personalize.validate(c)
  c2 = ml_collections.ConfigDict(c.to_dict())
  c2.data.colour = "red"
  with pytest.raises(JbatError, match="data.colour"):
    personalize.validate(c2)
  c3 = _tiny_config()
  c3.score.name = "magic"
  with pytest.raises(JbatError, match="score.name"):
    personalize.validate(c3)
  c4 = _tiny_config()
  c4.data.subjects_per_class = c4.data.n_clusters
  with pytest.raises(JbatError, match="data.subjects_per_class"):
    personalize.validate(c4)
  c5 = _tiny_config()
  c5.data.subject_classes = "7,12"
  with pytest.raises(JbatError, match="data.subject_classes"):
    personalize.validate(c5)


def test_make_task_splits_are_disjoint_and_consistent():
  cfg = _tiny_config()
  cfg.data.subject_classes = "7,3"
  data = images.load_digits()
  task = personalize.make_task(data, cfg)
  assert [s.name for s in task.subjects] == ["7-0", "7-1", "3-0", "3-1"]
  as_rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}
  for cls in (7, 3):
    subs = [s for s in task.subjects if s.cls == cls]
    sizes = task.cluster_sizes[cls]
    assert [s.cluster_size for s in subs] == sizes[:2] and sizes == sorted(sizes, reverse=True)
    class_imgs = {r.tobytes() for r in data.test_x[data.test_y == cls].reshape(-1, 64)}
    seen = set()
    for s in subs:
      assert len(s.adapt_x) == cfg.data.n_subject and len(s.val_x) == cfg.data.n_val
      parts = [as_rows(s.adapt_x), as_rows(s.val_x), as_rows(s.test_x)]
      assert sum(map(len, parts)) == len(set().union(*parts))  # disjoint splits
      assert not set().union(*parts) & seen and not set().union(*parts) & as_rows(s.drift_x)
      assert set().union(*parts) <= class_imgs and as_rows(s.drift_x) <= class_imgs
      seen |= set().union(*parts)
  assert np.all(np.diff(task.pool_ids) > 0) and len(task.pool_ids) == cfg.data.pool_size
  assert len(task.pretrain_ids) == len(data.train_y)  # backbone_keep = 1
  cfg.data.backbone_keep = 0.5
  thin = personalize.make_task(data, cfg)
  for cls in (7, 3):
    n_cls = int(np.sum(data.train_y == cls))
    assert int(np.sum(data.train_y[thin.pretrain_ids] == cls)) == round(0.5 * n_cls)
  other = ~np.isin(data.train_y, [7, 3])
  assert int(np.sum(other[thin.pretrain_ids])) == int(np.sum(other))


def test_fresh_workdir_with_a_warm_cache_reuses_the_backbones_evaluations(tiny_run, monkeypatch):
  """A new workdir on the same cache: the backbone's per-class table, its evaluation on each
  subject and the prior images come from the cache (no sampling from the backbone: the only
  generate calls are the adapted models', 2 per run), bitwise equal to the first run's."""
  tmp, wd, res = tiny_run
  calls = []
  real = personalize.generate
  monkeypatch.setattr(personalize, "generate",
                      lambda model, n, cls, ident, seed, config: calls.append(seed) or real(
                          model, n, cls, ident, seed, config))
  assert _main(_args(tmp, f"--config.workdir={tmp / 'wd2'}")) == 0
  again = json.loads((tmp / "wd2" / "results.json").read_text())
  n_runs = len(res["units"]) * len(res["arms"])
  assert len(calls) == 2 * n_runs
  assert again["backbone"]["class_accuracy"] == res["backbone"]["class_accuracy"]
  assert again["backbone_runs"] == res["backbone_runs"]
  assert again["summary"] == res["summary"]
  for name in ("backbone.png", "7-0.png"):
    assert (tmp / "wd2" / "grids" / name).read_bytes() == (wd / "grids" / name).read_bytes()


def test_results_doc_renders_the_run_with_report_mds_numbers(tiny_run):
  """docs/results.md's personalization section is generated from results.json: its metric
  rows are exactly report.md's, and it says whether albat met its goal, per reference."""
  from jbat import results_doc
  tmp, wd, res = tiny_run
  text = results_doc.render([wd])
  rows = [line for line in (wd / "report.md").read_text().splitlines()
          if line.startswith("| ") and ("| albat |" in line or "| none |" in line)]
  assert rows and all(row in text.splitlines() for row in rows)
  goal = next(line for line in text.splitlines() if line.startswith("Goal:"))
  st = res["summary"]["paired"]["albat"]["none"]["subject_fid"]
  want = "better" if st["lo"] > 0 else "worse" if st["hi"] < 0 else "a tie"
  assert f"subject fidelity vs none: {want}" in goal and "class preservation vs" in goal
  assert res["machine"]["cpu_count"] >= 1


def test_oracle_and_less_arms_extend_a_finished_run(tiny_run):
  """Adding arms to a finished workdir runs only the new units; the oracle draws the subject's
  look-alikes (its class, nearest its own cluster centre); less selects by LESS's scores."""
  import shutil
  tmp, wd, res = tiny_run
  ext = tmp / "wd_extended"
  shutil.copytree(wd, ext)
  finished = sorted(ext.glob("subjects/*/arms/*/seed_*/result.json"))
  stamps = {p: p.stat().st_mtime_ns for p in finished}
  argv = _args(tmp, "--config.arms=none,prior,random,oracle,albat,less")
  argv[3] = f"--config.workdir={ext}"
  assert _main(argv) == 0
  assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # not run again
  again = json.loads((ext / "results.json").read_text())
  assert again["arms"] == ["none", "prior", "random", "oracle", "albat", "less"]
  assert again["resumed"] and again["reused_units"] == len(finished) == 4 * len(res["units"])
  assert not res["resumed"] and res["reused_units"] == 0
  from jbat import results_doc  # pylint: disable=import-outside-toplevel
  section = results_doc.personalization_section(again, "wd_extended")
  assert "its last invocation only" in section and "- oracle ranks" in section
  for arm in res["arms"]:  # The finished arms' numbers are the ones of the first run.
    assert again["summary"]["arms"][arm] == res["summary"]["arms"][arm]
  cfg = _tiny_config()
  data = images.load_digits()
  task = personalize.make_task(data, cfg)
  pool = data.train_x[task.pool_ids].reshape(len(task.pool_ids), -1)
  for sub in task.subjects:
    # Brute force: the pool images of the class by distance to the subject's own centre.
    own = sorted((float(((x - sub.centre) ** 2).sum()), int(i))
                 for i, x, y in zip(task.pool_ids, pool, data.train_y[task.pool_ids])
                 if y == sub.cls)
    ranked = [i for _, i in own]
    assert task.oracle_ids[sub.name].tolist() == ranked and ranked
    table = stream.load_table(stream.scores_dir(ext / "subjects" / sub.name / "less" / "scores"),
                              ["less"])
    scores = table.scores["less"]
    assert np.all(np.isfinite(scores)) and np.ptp(scores) > 0
    top = set(task.pool_ids[np.argsort(-scores, kind="stable")[:cfg.select.top_n]].tolist())
    for seed in res["seeds"]:
      oracle = again["runs"]["oracle"][f"{sub.name}/{seed}"]
      assert oracle["aug_ids"] == sorted(ranked[:cfg.aug.k])
      assert oracle["aug_precision"] == 1.0
      less = again["runs"]["less"][f"{sub.name}/{seed}"]
      assert len(set(less["aug_ids"])) == cfg.aug.k and set(less["aug_ids"]) <= top
  assert "oracle" in again["summary"]["paired"]["albat"]
  assert "less" in again["summary"]["paired"]["albat"]
  report = (ext / "report.md").read_text()
  assert "- oracle ranks" in report and "- less: " in report
  argv[3] = f"--config.workdir={ext}"  # A changed non-arm key is still refused.
  assert _main(argv + ["--config.train.steps=7"]) == 2
