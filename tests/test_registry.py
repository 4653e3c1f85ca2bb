"""Names, the selection request and the run-folder layout: one definition each."""

import json

import pytest

from jbat import config as config_lib, layout, registry, selection
from jbat.errors import JbatError
from jbat.scoring import stream


def test_names_are_defined_once():
  assert stream.SCORE_NAMES is registry.SCORES and selection.RULES is registry.RULES
  assert set(registry.MODEL_SCORES) | {"dsir", "random"} == set(registry.SCORES)
  assert set(registry.CONTROL_SCORES) <= set(registry.MODEL_SCORES)
  assert set(registry.SIGN_SCORES) <= set(registry.MODEL_SCORES)


def test_score_for_and_reselects():
  c = config_lib.base_config()
  c.select.score = "rel_loss_diff"
  assert registry.score_for("albat", c) == "rel_loss_diff"
  assert registry.score_for("dsir", c) == "dsir"
  assert [registry.score_for(a, c) for a in ("none", "random", "oracle")] == [None] * 3
  assert registry.reselects("contrast") and not registry.reselects("dsir")
  assert not registry.reselects(None)
  # The peers select once, as their authors run them; albat re-selects whatever its score.
  assert [registry.arm_reselects(a, c) for a in ("albat", "align", "less", "dsir", "none")] == [
      True, True, False, False, False]
  c.select.score = "less"
  assert registry.arm_reselects("albat", c) and not registry.arm_reselects("less", c)


def test_tau_and_k():
  assert registry.parse_tau("default") == "default" and registry.parse_tau("none") is None
  assert registry.parse_tau(" 0.5 ") == 0.5
  with pytest.raises(JbatError, match="select.tau"):
    registry.parse_tau("zero")
  assert registry.resolve_tau("default", "align") == 0.0
  assert registry.resolve_tau("default", "less") is None
  assert registry.resolve_tau(0.25, "less") == 0.25
  assert registry.pool_k(256, 100) == 100 and registry.pool_k(16, 100) == 16
  assert registry.check_k(3, 3) == 3
  with pytest.raises(JbatError, match="larger than the backbone pool"):
    registry.check_k(4, 3)


def test_select_spec_from_config_and_request():
  c = config_lib.base_config()
  c.select.k, c.select.tau, c.select.rule, c.seed = 500, "none", "threshold_uniform", 7
  spec = selection.SelectSpec.from_config(c, n_pool=300, score="align")
  assert (spec.score, spec.k, spec.tau, spec.seed) == ("align", 300, None, 7)
  req = spec.request(n_adapt=10)
  assert req == {"score": "align", "k": 300, "tau": None, "rule": "threshold_uniform",
                 "top_n": 0, "n_clusters": 8, "select_seed": 7, "feature_dim": 64}
  assert selection.SelectSpec("loss_diff", k="3x").request(10)["k"] == 30
  with pytest.raises(JbatError, match="selection.score"):
    selection.SelectSpec("alignment", k=3)
  with pytest.raises(JbatError, match="selection.rule"):
    selection.SelectSpec("align", k=3, rule="best")
  with pytest.raises(JbatError, match="selection.tau"):
    selection.SelectSpec("align", k=3, tau="zero")


def test_layout_answers_whether_a_selection_is_done(tmp_path):
  folder = layout.select_dir(tmp_path, "align")
  assert folder == tmp_path / "select" / "align"
  assert layout.reselect_dir(layout.arm_dir(tmp_path, "albat", 1), 60) == (
      tmp_path / "arms" / "albat" / "seed_1" / "reselect" / "step_60")
  request = {"score": "align", "k": 3}
  assert not layout.selection_done(folder) and layout.stored_request(folder) is None
  layout.summary(folder).parent.mkdir(parents=True)
  layout.summary(folder).write_text(json.dumps({"request": request}))
  assert not layout.selection_matches(folder, request)  # No manifest yet: not done.
  layout.manifest(folder).write_text("")
  assert layout.selection_matches(folder, request)
  assert not layout.selection_matches(folder, {**request, "k": 4})
