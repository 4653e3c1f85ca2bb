"""The CLI end to end at toy size: report contents, kill -9 + rerun == straight run, bad inputs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from jbat import io
from tests import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli_cmd(*args):
  return [sys.executable, "-m", "jbat.train", "--config", str(ROOT / "configs/demo.py:tiny"),
          *args]


def run(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run(cli_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env,
                        cwd=ROOT)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  return d, synthetic.write_jsonl(d / "corpus.jsonl", 60)


def base_args(d, corpus_path, workdir):
  return [f"--config.cache_dir={d / 'cache'}", f"--config.workdir={workdir}",
          "--config.data.source=jsonl", f"--config.data.path={corpus_path}",
          "--config.data.label_field=domain", "--config.data.domain=space",
          "--config.data.n_adapt=8", "--config.data.n_heldout=16", "--config.progress=False"]


def test_end_to_end_report(corpus):
  d, path = corpus
  wd = d / "e2e"
  r = run(*base_args(d, path, wd))
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((wd / "results.json").read_text())
  # The tiny demo runs two arms over two paired seeds.
  assert sorted(results["arms"]) == ["albat", "none"] and results["seeds"] == [0, 1]
  assert results["default_score"] == "rel_loss_diff"
  arm = results["arms"]["none"]
  # best_nll is the minimum of the validation curve, at best_step; final_nll its last point;
  # the test NLL is reported at that step (and differs from the validation number).
  for curve, best, step, final in zip(arm["curves"], arm["best_nll"], arm["best_step"],
                                      arm["final_nll"]):
    assert best == min(v for _, v in curve) and dict(curve)[step] == best
    assert final == curve[-1][1]
  assert len(arm["test_nll_best"]) == 2 and arm["test_nll_best"] != arm["best_nll"]
  assert results["n_valid"] == 8 and results["n_test"] == 8 and results["test_reads"] == 4
  assert f"valid NLL backbone {arm['backbone_nll']:.4f}" in r.stdout
  report = (wd / "report.md").read_text()
  steps = set()
  for name, a in results["arms"].items():
    assert len(a["best_nll"]) == len(a["final_nll"]) == 2
    steps.add(a["steps"])
    row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    for metric in ("best_nll", "final_nll"):
      assert f"{np.mean(a[metric]):.4f} ± {np.std(a[metric], ddof=1):.4f}" in row
    for seed, best in zip(results["seeds"], a["best_nll"]):
      history = io.read_jsonl(wd / "arms" / name / f"seed_{seed}" / "metrics.jsonl")
      assert best == min(h["eval_loss"] for h in history if "eval_loss" in h)
  assert steps == {10}, "every arm must train the same number of steps"
  for metric in ("best_nll", "test_nll_best"):  # The report's differences are on the test.
    diff = results["stats"]["albat"][f"{metric}_vs_none"]
    expected = np.mean(np.array(results["arms"]["albat"][metric]) - arm[metric])
    assert abs(diff["mean"] - expected) < 1e-12
  assert f"{diff['mean']:+.4f} [" in report
  manifest = io.read_jsonl(wd / "select" / "rel_loss_diff" / "selection" / "manifest.jsonl")
  assert len(manifest) == 16 and results["arms"]["albat"]["n_selected"] == 16
  assert (wd / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((wd / "config.json").read_text())
  assert saved["config"]["data"]["domain"] == "space"
  # A second run with the same config reuses the cached backbone and the finished arm.
  r2 = run(*base_args(d, path, wd))
  assert r2.returncode == 0, r2.stderr[-3000:]
  assert "loaded from cache" in r2.stdout
  timeless = lambda a: {k: v for k, v in a.items() if not k.endswith("seconds")}
  again = json.loads((wd / "results.json").read_text())["arms"]["none"]
  assert timeless(again) == timeless(arm)


def test_kill_and_rerun_equals_straight_run(corpus):
  d, path = corpus
  extra = ["--config.train.steps=300", "--config.train.ckpt_every=5", "--config.arms=none",
           "--config.seeds=0", "--config.train.eval_every=100", "--config.model.d_model=64"]
  straight = d / "straight"
  r = run(*base_args(d, path, straight), *extra)
  assert r.returncode == 0, r.stderr[-3000:]

  killed = d / "killed"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.Popen(cli_cmd(*base_args(d, path, killed), *extra), env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = killed / "arms" / "none" / "seed_0" / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (killed / "arms/none/seed_0/adapter.safetensors").exists(), "finished before kill"

  r = run(*base_args(d, path, killed), *extra)
  assert r.returncode == 0, r.stderr[-3000:]
  a = safetensors.numpy.load_file(str(straight / "arms/none/seed_0/adapter.safetensors"))
  b = safetensors.numpy.load_file(str(killed / "arms/none/seed_0/adapter.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  strip = lambda rs: [{k: v for k, v in x.items() if k != "examples_per_s"} for x in rs]
  assert strip(io.read_jsonl(straight / "arms/none/seed_0/metrics.jsonl")) == strip(
      io.read_jsonl(killed / "arms/none/seed_0/metrics.jsonl"))


@pytest.mark.parametrize("override,needle", [
    ("--config.data.domain=knitting", "'knitting'"),
    ("--config.data.n_heldout=500", "space"),
])
def test_bad_task_exits_2_without_writing(corpus, override, needle):
  d, path = corpus
  wd = d / "bad"
  r = run(*base_args(d, path, wd), override)
  assert r.returncode == 2, r.stderr[-2000:]
  assert needle in r.stderr and "Traceback" not in r.stderr
  assert not wd.exists()


def test_bad_jsonl_line_names_file_and_line(corpus, tmp_path):
  d, _ = corpus
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok", "domain": "space"}\n{"body": "no text", "domain": "space"}\n')
  r = run(*base_args(d, bad, tmp_path / "wd"))
  assert r.returncode == 2
  assert "bad.jsonl" in r.stderr and "line 2" in r.stderr and "text" in r.stderr
  assert not (tmp_path / "wd").exists()


def test_missing_corpus_folder(corpus, tmp_path):
  d, _ = corpus
  r = run(f"--config.cache_dir={d / 'cache'}", f"--config.workdir={tmp_path / 'wd'}",
          "--config.data.source=text_folder", f"--config.data.path={tmp_path / 'nowhere'}")
  assert r.returncode == 2 and "nowhere" in r.stderr and "does not exist" in r.stderr


def test_workdir_of_different_config_refused(corpus):
  d, path = corpus
  wd = d / "e2e_other"
  assert run(*base_args(d, path, wd), "--config.train.steps=2").returncode == 0
  r = run(*base_args(d, path, wd), "--config.train.steps=3")
  assert r.returncode == 2 and "different config" in r.stderr


def test_cli_with_own_hf_model(corpus, tmp_path):
  """README "Use your own model": a tiny model saved in Hugging Face layout, run by the CLI."""
  from flax import nnx
  from jbat.data.tokenizer import train_bpe_tokenizer
  from jbat.models.causal_lm import CausalLM, LMConfig
  from jbat.models.hf_io import save_causal_lm
  d, path = corpus
  texts = [x["text"] for x in synthetic.documents(60)]
  tok = train_bpe_tokenizer(texts, 300, tmp_path / "tokenizer.json")
  cfg = LMConfig(vocab_size=len(tok), max_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                 n_kv_heads=2, pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
                 bias=False)
  hf_dir = tmp_path / "hf_model"
  save_causal_lm(CausalLM(cfg, rngs=nnx.Rngs(0)), tok, hf_dir)
  assert (hf_dir / "config.json").exists() and (hf_dir / "model.safetensors").exists()
  wd = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  r = subprocess.run(
      [sys.executable, "-m", "jbat.train", "--config", str(ROOT / "configs/hf_lora.py") + ":corpus",
       f"--config.model.pretrained={hf_dir}", f"--config.data.path={path}",
       "--config.data.domain=space", "--config.data.n_adapt=8", "--config.data.n_heldout=16",
       "--config.data.max_len=32", "--config.train.steps=6", "--config.train.eval_every=3",
       "--config.train.ckpt_every=3", f"--config.workdir={wd}",
       f"--config.cache_dir={tmp_path / 'cache'}", "--config.progress=False"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "loading Hugging Face model" in r.stdout
  res = json.loads((wd / "results.json").read_text())
  assert res["lm_config"]["pos"] == "rope" and res["lm_config"]["n_kv_heads"] == 2
  none = res["arms"]["none"]
  assert none["best_nll"][0] == min(v for _, v in none["curves"][0])
  assert dict(none["curves"][0])[none["best_step"][0]] == none["best_nll"][0]
  assert none["test_nll_best"][0] != none["best_nll"][0]
  assert not (tmp_path / "cache" / "backbones").exists()  # Nothing was pretrained.
  # A wrong path is a clear config error.
  r = subprocess.run(
      [sys.executable, "-m", "jbat.train", "--config", str(ROOT / "configs/hf_lora.py") + ":corpus",
       f"--config.data.path={path}", f"--config.workdir={tmp_path / 'run2'}"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert r.returncode == 2 and "model.pretrained" in r.stderr and "my-hf-model" in r.stderr
