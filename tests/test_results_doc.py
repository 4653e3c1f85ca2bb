"""docs/results.md is generated (jbat.results_doc) from results.json files: a small synthetic
results.json gives the expected table and verdicts."""

import json

from jbat import report, results_doc


def synthetic_results() -> dict:
  arms = {
      "none": {"test_nll_best": [3.0, 3.1, 3.2], "best_nll": [2.9, 3.0, 3.1],
               "distinct_docs": [0, 0, 0]},
      "random": {"test_nll_best": [3.1, 3.2, 3.3], "best_nll": [3.0, 3.1, 3.2],
                 "distinct_docs": [10, 10, 10]},
      "oracle": {"test_nll_best": [2.8, 2.9, 3.0], "best_nll": [2.7, 2.8, 2.9],
                 "distinct_docs": [15, 15, 16]},
      "albat": {"test_nll_best": [2.7, 2.95, 2.92], "best_nll": [2.6, 2.9, 2.8],
                "distinct_docs": [15, 15, 16]},
  }
  return {"config": "toy", "domain": "space", "seeds": [0], "split_seeds": [0, 1, 2],
          "draw_seeds": [0], "pairs": [[0, 0, 0], [1, 0, 0], [2, 0, 0]], "arms": arms,
          "stats": report.paired_stats(arms), "n_adapt": 8, "n_valid": 8, "n_test": 8,
          "n_pool": 1234, "near_dup": {"threshold": 0.6, "n": 5, "dropped": 3},
          "near_dup_dropped_per_split": [3, 4, 2], "seconds": 90.0,
          "machine": {"cpu": "Toy CPU", "cpu_count": 2, "system": "Linux", "python": "3.11.0",
                      "jax": "0.0.1", "backend": "cpu", "devices": 1, "device_kind": "cpu"}}


def render(tmp_path, res: dict, name: str) -> str:
  """docs/results.md's text for one run folder `name` holding `res` as its results.json."""
  run = tmp_path / name
  run.mkdir()
  (run / "results.json").write_text(json.dumps(res))
  out = tmp_path / "results.md"
  assert results_doc.main([str(run), "-o", str(out)]) == 0
  return out.read_text()


def test_generated_table_from_synthetic_results(tmp_path):
  run = tmp_path / "runs" / "toy"
  run.mkdir(parents=True)
  (run / "results.json").write_text(json.dumps(synthetic_results()))
  out = tmp_path / "results.md"
  assert results_doc.main([str(run), "-o", str(out)]) == 0
  text = out.read_text()
  assert "`python -m jbat.results_doc " in text and "on one machine" in text
  assert "Machine: Toy CPU (2 cores), Linux, python 3.11.0, jax 0.0.1 on 1 cpu device(s)" in text
  assert "Pairs: 3 (split seeds 0, 1, 2; draw seeds 0; training seeds 0)" in text
  assert "backbone pool 1,234 (3, 4, 2 near-duplicates of the target's documents dropped)" in text
  assert "Wall time 1.5 min." in text
  table = [line for line in text.splitlines() if line.startswith("| ")]
  assert table == [
      "| arm | test NLL (best valid step) | vs none [95% CI] | vs random [95% CI] | "
      "vs oracle [95% CI] | gap closed | distinct docs | valid NLL (best) |",
      "| none | 3.1000 ± 0.1000 | - | -0.1000 [-0.1000, -0.1000] | "
      "+0.2000 [+0.2000, +0.2000] | - | 0 | 3.0000 ± 0.1000 |",
      "| random | 3.2000 ± 0.1000 | +0.1000 [+0.1000, +0.1000] | - | "
      "+0.3000 [+0.3000, +0.3000] | - | 10 | 3.1000 ± 0.1000 |",
      "| oracle | 2.9000 ± 0.1000 | -0.2000 [-0.2000, -0.2000] | -0.3000 [-0.3000, -0.3000] | "
      "- | - | 15 | 2.8000 ± 0.1000 |",
      "| albat | 2.8567 ± 0.1365 | -0.2433 [-0.4457, -0.0410] | -0.3433 [-0.5457, -0.1410] | "
      "-0.0433 [-0.2457, +0.1590] | 114% | 15 | 2.7667 ± 0.1528 |",
  ]
  stats = synthetic_results()["stats"]["albat"]  # Validation's own gap, to choose on.
  assert abs(stats["gap_closed_valid"] - (3.1 - (2.6 + 2.9 + 2.8) / 3) / (3.1 - 2.8)) < 1e-9
  assert ("- `albat` beats none: yes (-0.2433 [-0.4457, -0.0410]); random: yes "
          "(-0.3433 [-0.5457, -0.1410]); oracle: no, a tie (-0.0433 [-0.2457, +0.1590]).") in text


def test_missing_results_is_a_clean_error(tmp_path, capsys):
  assert results_doc.main([str(tmp_path / "nothing"), "-o", str(tmp_path / "r.md")]) == 2
  assert capsys.readouterr().err.startswith("jbat: error: results_doc: cannot read")


def test_generation_metrics_and_answers_are_rendered(tmp_path):
  res = synthetic_results()
  for name, rouge in (("none", [0.10, 0.12, 0.11]), ("random", [0.12, 0.12, 0.13]),
                      ("oracle", [0.2, 0.2, 0.2]), ("albat", [0.15, 0.16, 0.17])):
    res["arms"][name]["test_rouge_l_best"] = rouge
    res["arms"][name]["test_exact_match_best"] = [0.0, 0.0, 0.0]
  res["arms"]["albat"]["answers_best"] = [
      {"reference": "a hack | kludge", "answer": "a kludge", "rouge_l": 0.5}]
  res["task_stats"] = report.task_stats(res["arms"])
  text = render(tmp_path, res, "gen")
  # albat - none ROUGE-L by pair: +0.05, +0.04, +0.06.
  assert "| albat | 2.8567 ± 0.1365 |" in text and "| 0.1600 ± 0.0100 | +0.0500 [" in text
  assert "| a hack \\| kludge | a kludge | 0.500 |" in text


def test_readme_blocks_are_regenerated_from_results(tmp_path, monkeypatch):
  run = tmp_path / "runs" / "toy"
  run.mkdir(parents=True)
  (run / "results.json").write_text(json.dumps(synthetic_results()))
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- results_doc: runs/toy -->\n| stale | typed in |\n"
                    "<!-- /results_doc -->\nafter\n")
  monkeypatch.chdir(tmp_path)
  assert results_doc.main(["--readme", "README.md"]) == 0
  text = readme.read_text()
  assert "stale" not in text and text.startswith("intro\n") and text.endswith("after\n")
  assert ("| albat | 2.8567 | -0.2433 [-0.4457, -0.0410] | -0.3433 [-0.5457, -0.1410] |"
          in text)
  assert results_doc.main(["--readme", "README.md"]) == 0 and readme.read_text() == text


def test_missing_readme_is_a_clean_error(tmp_path, capsys):
  assert results_doc.main(["--readme", str(tmp_path / "NOPE.md")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jbat: error: results_doc: cannot read --readme") and "Traceback" not in err


def test_resumed_run_says_its_wall_time_is_the_last_invocation(tmp_path):
  run = tmp_path / "runs" / "toy"
  run.mkdir(parents=True)
  (run / "results.json").write_text(json.dumps({**synthetic_results(), "resumed": True}))
  out = tmp_path / "results.md"
  assert results_doc.main([str(run), "-o", str(out)]) == 0
  assert ("Wall time 1.5 min (its last invocation only: it continued a run started earlier)."
          in out.read_text())


def test_albat_against_the_peer_baselines_is_paired_from_results_json(tmp_path):
  res = synthetic_results()
  res["arms"]["less"] = {"test_nll_best": [2.8, 2.96, 2.95], "best_nll": [2.7, 2.9, 2.9]}
  res["arms"]["dsir"] = {"test_nll_best": [3.7, 3.95, 3.92], "best_nll": [3.6, 3.9, 3.8]}
  res["stats"] = report.paired_stats(res["arms"])
  text = render(tmp_path, res, "toy")
  less = report.interval(report.paired_interval([-0.1, -0.01, -0.03]))
  assert f"- albat - less (test NLL, paired): {less}: a tie." in text
  assert "- albat - dsir (test NLL, paired): -1.0000 [-1.0000, -1.0000]: ALBAT better." in text


def test_outcome_reads_where_a_paired_interval_lies_against_zero():
  """report.outcome is the one rule behind every verdict word: an interval touching 0 is a tie,
  a single pair has no interval."""
  assert report.outcome(report.paired_interval([-0.3, -0.2, -0.25])) == "below"
  assert report.outcome(report.paired_interval([0.3, 0.2, 0.25])) == "above"
  assert report.outcome(report.paired_interval([-0.3, 0.2, 0.05])) == "tie"
  assert report.outcome({"mean": 0.0, "lo": -0.1, "hi": 0.0, "n": 2}) == "tie"
  assert report.outcome({"mean": 0.1, "lo": 0.0, "hi": 0.2, "n": 2}) == "tie"
  assert report.outcome(report.paired_interval([-0.3])) is None
