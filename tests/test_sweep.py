"""jbat.sweep: defaults are chosen on validation, by the paired rule, never from test numbers."""

import json

import pytest

from jbat import sweep
from jbat.errors import JbatError

PAIRS = [[s, 0, t] for s in range(3) for t in range(2)]


def make_run(root, name, valid, test, score="rel_loss_diff", pairs=PAIRS):
  d = root / name
  d.mkdir()
  cfg = {"name": name, "workdir": str(d), "select": {"score": score, "k": 256}}
  (d / "config.json").write_text(json.dumps({"config": cfg, "fingerprint": "x"}))
  res = {"pairs": pairs, "seeds": [0, 1],
         "arms": {"albat": {"best_nll": valid, "test_nll_best": test}}}
  (d / "results.json").write_text(json.dumps(res))
  return str(d)


def test_variant_clearly_better_on_validation_is_chosen(tmp_path):
  ref = make_run(tmp_path, "ref", [3.0, 3.1, 3.2, 3.0, 3.1, 3.2], [2.0] * 6)
  # Better on validation in every pair (by 0.01-0.03), but far worse on test: test must not
  # matter.
  good = make_run(tmp_path, "good", [2.99, 3.08, 3.17, 2.98, 3.09, 3.19], [9.0] * 6,
                  score="align")
  # Better on average but not in every pair: a tie under the rule.
  tie = make_run(tmp_path, "tie", [2.9, 3.2, 3.1, 3.1, 3.0, 3.25], [0.0] * 6,
                 score="loss_diff")
  result = sweep.compare([ref, good, tie])
  assert result["chosen"] == good
  rows = {r["run"]: r for r in result["rows"]}
  assert rows[good]["changes"] == {"select.score": "align"}
  assert rows[good]["vs_reference"]["hi"] < 0
  assert rows[tie]["vs_reference"]["lo"] < 0 < rows[tie]["vs_reference"]["hi"]
  text = sweep.render(result)
  assert "9.0000" not in text and "0.0000 " not in text
  assert not any("test" in k for r in result["rows"] for k in r)


def test_reference_stays_without_a_clear_winner(tmp_path):
  ref = make_run(tmp_path, "ref", [3.0, 3.1, 3.2, 3.0, 3.1, 3.2], [2.0] * 6)
  worse = make_run(tmp_path, "worse", [3.01, 3.12, 3.21, 3.02, 3.11, 3.23], [1.0] * 6,
                   score="align")
  assert sweep.compare([ref, worse])["chosen"] == ref


def test_pairs_are_matched_by_split_draw_seed(tmp_path):
  ref = make_run(tmp_path, "ref", [3.0, 3.1, 3.2, 3.0, 3.1, 3.2], [2.0] * 6)
  # A one-seed variant: only the seed-0 pairs, listed in another order.
  sub = [[2, 0, 0], [0, 0, 0], [1, 0, 0]]
  var = make_run(tmp_path, "var", [3.1, 2.9, 2.9], [2.0] * 3, score="align", pairs=sub)
  row = sweep.compare([ref, var])["rows"][1]
  assert row["n"] == 3
  # The reference's seed-0 values: split 0 3.0, split 1 3.2, split 2 3.1; so the
  # differences are -0.1, -0.3 and 0.0.
  assert row["vs_reference"]["mean"] == pytest.approx(-0.4 / 3)
  assert row["reference_mean"] == pytest.approx(3.1)


def test_cli_writes_table_and_rejects_bad_input(tmp_path, capsys):
  ref = make_run(tmp_path, "ref", [3.0] * 6, [2.0] * 6)
  var = make_run(tmp_path, "var", [2.9, 2.95, 2.9, 2.92, 2.9, 2.91], [2.0] * 6, score="align")
  out = tmp_path / "defaults.md"
  assert sweep.main([ref, var, "-o", str(out)]) == 0
  assert "**yes**" in out.read_text() and json.loads(out.with_suffix(".json").read_text())
  assert sweep.main([ref, str(tmp_path / "missing")]) == 2
  assert "is not a finished run" in capsys.readouterr().err
  assert sweep.main([ref, var, "--arm", "less"]) == 2
  with pytest.raises(JbatError, match="at least one variant"):
    sweep.compare([ref])
