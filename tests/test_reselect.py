"""BAT re-selection around the current adapter (bat.reselect_every), through experiment.run at
toy size: the phases, the candidates, and that an interrupted run (during the re-selection, and
in the middle of the second phase) resumes to the same result."""

import pathlib

import numpy as np
import pytest
import safetensors.numpy

from jbat import albat, config as config_lib, experiment, io
from jbat.errors import JbatError
from tests import synthetic
from tests.test_training import Interrupt, StopAfter

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("reselect")
  return d, synthetic.write_jsonl(d / "corpus.jsonl", 60)


def make_config(corpus, name, **bat):
  d, path = corpus
  c = config_lib.load_config_file(ROOT / "configs" / "demo.py", "tiny")
  c.cache_dir, c.workdir, c.progress = str(d / "cache"), str(d / name), False
  c.data.source, c.data.path = "jsonl", str(path)
  c.data.label_field, c.data.domain = "domain", "space"
  c.data.n_adapt, c.data.n_heldout = 8, 16
  c.arms, c.seeds = "albat", "0"
  c.train.ckpt_every = 2  # Also a checkpoint inside the second phase, to resume from.
  for k, v in bat.items():
    c.bat[k] = v
  config_lib.validate(c)
  return c


def test_phase_ends():
  assert experiment.phase_ends(10, 0) == [10]
  assert experiment.phase_ends(10, 5) == [5, 10]
  assert experiment.phase_ends(10, 4) == [4, 8, 10]
  assert experiment.phase_ends(10, 10) == [10]


def test_config_checks(corpus):
  with pytest.raises(JbatError, match="bat.reselect_top"):
    make_config(corpus, "bad", reselect_every=5, reselect_top=3)
  with pytest.raises(JbatError, match="bat.reselect_every"):
    make_config(corpus, "bad", reselect_every=-1)
  with pytest.raises(JbatError, match="bat.reselect_from"):
    make_config(corpus, "bad", reselect_every=5, reselect_from="current")


def test_reselection_runs_phases_and_resumes(corpus, monkeypatch):
  d, _ = corpus
  # reselect_every >= train.steps: a single phase, as without re-selection.
  plain = experiment.run(make_config(corpus, "plain", reselect_every=20))["arms"]["albat"]
  assert "reselections" not in plain
  ref = experiment.run(make_config(corpus, "ref", reselect_every=5, reselect_top=40))
  arm = ref["arms"]["albat"]
  assert arm["steps"] == 10
  # Phase 1 trains exactly as the run without re-selection; then the data change.
  assert arm["curves"][0][:2] == plain["curves"][0][:2]
  (only,), = arm["reselections"]
  assert only["step"] == 5 and 0 <= only["overlap"] <= 1 and only["precision"] is not None
  report = (d / "ref" / "report.md").read_text()
  assert f"`albat` re-selected 1 time(s) around its adapter (step 5: overlap {only['overlap']:.2f}" \
      in report
  folder = d / "ref" / "arms" / "albat" / "seed_0" / "reselect" / "step_5"
  chosen = [r["id"] for r in io.read_jsonl(folder / "selection" / "manifest.jsonl")]
  candidates = albat.top_pool_ids(d / "ref" / "select" / "rel_loss_diff", "rel_loss_diff", 40)
  assert len(chosen) == 16 and set(chosen) <= set(candidates)
  # The re-selection's surrogate starts from the trained BAT adapter (LoRA B is zero at init).
  phi0 = safetensors.numpy.load_file(str(folder / "surrogate" / "phi0.safetensors"))
  assert any("lora_b" in k and np.abs(v).max() > 0 for k, v in phi0.items())

  # Crash 1: during the re-selection (after the checkpoint at step 5).
  real_select = albat.select_backbone_data

  def crash_on_reselect(*args, **kw):
    if kw.get("init_adapter") is not None:
      raise Interrupt
    return real_select(*args, **kw)

  monkeypatch.setattr(albat, "select_backbone_data", crash_on_reselect)
  with pytest.raises(Interrupt):
    experiment.run(make_config(corpus, "resumed", reselect_every=5, reselect_top=40))
  monkeypatch.setattr(albat, "select_backbone_data", real_select)

  # Crash 2: three batches into the second phase (its last checkpoint is step 6).
  real_loader = experiment.mixture.mixture_loader

  def crash_in_phase_1(*args, **kw):
    it = real_loader(*args, **kw)
    return StopAfter(it, 3) if kw.get("phase") == 1 else it

  monkeypatch.setattr(experiment.mixture, "mixture_loader", crash_in_phase_1)
  with pytest.raises(Interrupt):
    experiment.run(make_config(corpus, "resumed", reselect_every=5, reselect_top=40))
  monkeypatch.setattr(experiment.mixture, "mixture_loader", real_loader)

  resumed = experiment.run(make_config(corpus, "resumed", reselect_every=5, reselect_top=40))
  got = resumed["arms"]["albat"]
  for key in ("best_nll", "final_nll", "best_step", "curves", "reselections", "steps"):
    assert got[key] == arm[key], key
  a, b = (safetensors.numpy.load_file(str(d / run / "arms" / "albat" / "seed_0" /
                                         "adapter.safetensors")) for run in ("ref", "resumed"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_reselect_from_init_is_the_stage1_ranking_resampled(corpus):
  """The control: at step 5 the stage-1 surrogate is trained again (bitwise the same phi_s) and
  a new sample of its ranking is drawn."""
  d, _ = corpus
  res = experiment.run(make_config(corpus, "control", reselect_every=5, reselect_top=40,
                                   reselect_from="init"))
  (only,), = res["arms"]["albat"]["reselections"]
  folder = d / "control" / "arms" / "albat" / "seed_0" / "reselect" / "step_5"
  first = d / "control" / "select" / "rel_loss_diff"
  again, stage1 = (safetensors.numpy.load_file(str(f / "surrogate" / "phi_s.safetensors"))
                   for f in (folder, first))
  assert again.keys() == stage1.keys()
  for k in stage1:
    np.testing.assert_array_equal(again[k], stage1[k], err_msg=k)
  chosen = {r["id"] for r in io.read_jsonl(folder / "selection" / "manifest.jsonl")}
  initial = {r["id"] for r in io.read_jsonl(first / "selection" / "manifest.jsonl")}
  assert chosen <= set(albat.top_pool_ids(first, "rel_loss_diff", 40))
  assert chosen != initial and only["overlap"] == len(chosen & initial) / len(chosen)
