"""A diverging run stops cleanly (exit 2, nothing non-finite written, the last finite checkpoint
kept); the workdir lock refuses a second run but not the leftover of a killed one; two runs
sharing one cache at once both finish with the same results."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from jbat import io, train
from tests import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/demo.py:tiny")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A labelled corpus and a tiny Hugging Face model folder (no pretraining needed)."""
  d = tmp_path_factory.mktemp("reliab")
  corpus = synthetic.tiny_hf_corpus(d)
  return d, corpus


def args(d, corpus, workdir, *extra):
  return ["jbat", "--config", CONFIG, f"--config.cache_dir={d / 'cache'}",
          f"--config.workdir={workdir}", "--config.data.source=jsonl",
          f"--config.data.path={corpus}", "--config.data.label_field=domain",
          "--config.data.domain=space", "--config.data.n_adapt=8", "--config.data.n_heldout=16",
          f"--config.model.pretrained={d / 'hf'}", "--config.progress=False", *extra]


def all_finite_json(path: pathlib.Path) -> bool:
  text = path.read_text()
  return "NaN" not in text and "Infinity" not in text and io.first_non_finite(
      json.loads(text)) is None


def test_divergence_stops_the_run_cleanly(shared, tmp_path, capsys):
  d, corpus = shared
  wd = tmp_path / "wd"
  rc = train.main(args(d, corpus, wd, "--config.train.lr=1e6", "--config.arms=none,random",
                       "--config.seeds=0", "--config.train.ckpt_every=1"))
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("jbat: error:")]
  assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
  line = errors[0]
  for word in ("arm none seed 0", "arm random seed 0", "adapter training diverged at step",
               "train.lr=1e+06 is too high"):
    assert word in line, (word, line)
  results = json.loads((wd / "results.json").read_text())
  assert all_finite_json(wd / "results.json")
  assert results["arms"] == {} and sorted(results["diverged"]) == ["none", "random"]
  assert "diverged" in (wd / "report.md").read_text()
  for arm in ("none", "random"):
    record = results["diverged"][arm]
    assert record["seed"] == 0 and f"at step {record['step']}" in line
    run = wd / "arms" / arm / "seed_0"
    assert not (run / "adapter.safetensors").exists()
    for r in io.read_jsonl(run / "metrics.jsonl"):
      assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    # The kept checkpoints all precede the divergence and hold finite values.
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < record["step"]
    state = ocp.PyTreeCheckpointer().restore((run / "checkpoints" / str(steps[-1]) / "state")
                                             .absolute())
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(state)]
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f")
    if (run / "best.safetensors").exists():
      best = safetensors.numpy.load_file(str(run / "best.safetensors"))
      assert all(np.all(np.isfinite(v)) for v in best.values())
  # A rerun resumes from the last finite checkpoint and stops with the same error.
  rc = train.main(args(d, corpus, wd, "--config.train.lr=1e6", "--config.arms=none,random",
                       "--config.seeds=0", "--config.train.ckpt_every=1"))
  err2 = capsys.readouterr().err
  assert rc == 2 and [x for x in err2.splitlines() if x.startswith("jbat: error:")] == errors


def error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = [x for x in err.splitlines() if x.startswith("jbat: error:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  return lines[0]


def test_workdir_lock_held_then_released_by_a_kill(shared, tmp_path, capsys):
  """A run holding the workdir refuses a second one (exit 2, names its pid); once it is
  killed (its lock file left behind) the workdir is usable again."""
  d, corpus = shared
  wd = tmp_path / "wd"
  wd.mkdir()
  # Stands for a run that holds the lock; its model folder is broken so that our run, once
  # past the lock, stops right after preparing the workdir.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys, time\n"
       f"f = open({str(wd / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
       "f.write(f'{os.getpid()} somehost\\n'); f.flush(); print('locked', flush=True)\n"
       "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  broken = tmp_path / "hf"
  broken.mkdir()
  (broken / "config.json").write_text("{")
  argv = args(d, corpus, wd, f"--config.model.pretrained={broken}")
  assert train.main(argv) == 2
  assert f"in use by pid {holder.pid} on somehost" in error_line(capsys)
  assert not (wd / "config.json").exists()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert (wd / ".lock").read_text().startswith(str(holder.pid))  # Left behind, stale.
  assert train.main(argv) == 2
  assert "not valid JSON" in error_line(capsys)  # Past the lock: the next problem.
  assert (wd / "config.json").exists()
  assert (wd / ".lock").read_text().split()[0] == str(os.getpid())


def test_two_runs_sharing_a_cache_at_once(tmp_path):
  """Two CLI runs (other workdirs) start together on an empty cache: one trains the tokenizer
  and pretrains the backbone while the other waits for it and loads it; both finish."""
  corpus = synthetic.write_jsonl(tmp_path / "corpus.jsonl", 30)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  cmd = lambda wd: [sys.executable, "-m", "jbat.train", *args(  # noqa: E731
      tmp_path, corpus, wd, "--config.arms=random", "--config.stop_after=select",
      "--config.model.pretrained=", "--config.backbone.steps=6")[1:]]
  procs = [subprocess.Popen(cmd(tmp_path / f"wd{i}"), env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert sorted("loaded from cache" in o for o in outs) == [False, True], outs
  (folder,) = [p for p in (tmp_path / "cache" / "backbones").iterdir() if p.is_dir()]
  assert all(str(folder) in o for o in outs)
  assert (folder / "model.safetensors").exists()
  assert not (folder / "pretrain" / "checkpoints").exists()
  assert len(list((tmp_path / "cache" / "tokenizers").glob("tokenizer-*.json"))) == 1


def test_score_cursor_only_moves_forward(tmp_path):
  """Two runs filling one score cache folder: the slower one's cursor writes never undo the
  faster one's "done", which its load_table would otherwise refuse."""
  from jbat.scoring import stream
  stream._write_cursor(tmp_path, "fp", 3, 3, 30)  # Run A finished.
  stream._write_cursor(tmp_path, "fp", 2, 3, 30)  # Run B, one chunk behind.
  cursor = json.loads((tmp_path / stream.CURSOR_FILE).read_text())
  assert cursor["done"] and cursor["next_chunk"] == 3
  stream._write_cursor(tmp_path, "other", 1, 3, 30)  # Other inputs: not this cursor's run.
  assert json.loads((tmp_path / stream.CURSOR_FILE).read_text())["fingerprint"] == "other"
