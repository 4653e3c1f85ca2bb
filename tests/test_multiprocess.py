"""Multi-process runs (jax.distributed with a localhost coordinator, gloo CPU collectives).

The CLI runs surrogate -> score -> select (`stop_after=select`) on a small pool as 1 process and
as 2 processes over the same global mesh; the manifests must be byte-identical. A run whose
process 1 is SIGKILLed mid-scoring is rerun and must resume to the identical manifest; one
killed mid-BAT-training (arm random) resumes to the adapter of an uninterrupted run.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from jbat import io
from tests import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
MANIFEST = pathlib.Path("select/loss_diff/selection/manifest.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from flax import nnx
  from jbat.data.tokenizer import train_bpe_tokenizer
  from jbat.models.causal_lm import CausalLM, LMConfig
  from jbat.models.hf_io import save_causal_lm
  d = tmp_path_factory.mktemp("mp")
  corpus = synthetic.write_jsonl(d / "corpus.jsonl", 150)
  tok = train_bpe_tokenizer([x["text"] for x in synthetic.documents(60)], 300,
                            d / "tokenizer.json")
  cfg = LMConfig(vocab_size=len(tok), max_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                 qkv_bias=True)
  save_causal_lm(CausalLM(cfg, rngs=nnx.Rngs(0)), tok, d / "hf")
  return d, corpus


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


SELECT = ("--config.arms=albat", "--config.stop_after=select")
# BAT training of arm random (no scoring), a checkpoint every other step.
BAT = ("--config.arms=random", "--config.train.steps=8", "--config.train.ckpt_every=2",
       "--config.train.eval_every=4", "--config.train.log_every=2")
ADAPTER = pathlib.Path("arms/random/seed_0/adapter.safetensors")


def launch(d, corpus, workdir, n_proc, devices_per_proc, stage=SELECT):
  """Starts the CLI as `n_proc` processes of `devices_per_proc` CPU devices each."""
  args = [sys.executable, "-m", "jbat.train", "--config",
          str(ROOT / "configs/hf_lora.py") + ":corpus",
          f"--config.model.pretrained={d / 'hf'}", f"--config.data.path={corpus}",
          "--config.data.domain=space", "--config.data.n_adapt=8", "--config.data.n_heldout=16",
          "--config.data.max_len=32", "--config.surrogate.steps=10",
          "--config.select.batch_size=8", "--config.select.chunk_batches=1",
          "--config.select.k=32", *stage,
          "--config.progress=False", f"--config.workdir={workdir}",
          # Its own cache per run: the pool scores are cached by content, and a run that found
          # another run's scores would not score at all.
          f"--config.cache_dir={workdir}_cache"]
  return start_processes(args, workdir, n_proc, devices_per_proc)


def start_processes(args, workdir, n_proc, devices_per_proc):
  """Starts `args` as n_proc jax processes of devices_per_proc CPU devices each (connected
  through JBAT_COORDINATOR on a free localhost port when n_proc > 1); process i logs to
  `<workdir>.log<i>`. Returns the Popen objects."""
  port = _free_port()
  procs = []
  for i in range(n_proc):
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}")
    if n_proc > 1:
      env.update(JBAT_COORDINATOR=f"localhost:{port}", JBAT_NUM_PROCESSES=str(n_proc),
                 JBAT_PROCESS_ID=str(i))
    log = open(f"{workdir}.log{i}", "w")
    procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
  return procs


def finish(procs, workdir, timeout=300):
  for i, p in enumerate(procs):
    rc = p.wait(timeout=timeout)
    assert rc == 0, pathlib.Path(f"{workdir}.log{i}").read_text()[-3000:]


def run(d, corpus, name, n_proc, devices_per_proc) -> bytes:
  workdir = d / name
  finish(launch(d, corpus, workdir, n_proc, devices_per_proc), workdir)
  (cursor,) = pathlib.Path(f"{workdir}_cache").glob("scores/*/cursor.json")
  assert json.loads(cursor.read_text())["done"]  # This run scored the pool itself.
  return (workdir / MANIFEST).read_bytes()


REFERENCE = {}


def test_two_processes_match_one_process(setup):
  d, corpus = setup
  one = run(d, corpus, "p1x2", 1, 2)
  two = run(d, corpus, "p2x1", 2, 1)
  assert one == two and one.count(b"\n") == 32
  REFERENCE["2 devices"] = one
  log0 = (d / "p2x1.log0").read_text()
  assert "(2 processes, 2 devices)" in log0 and "documents selected" in log0
  assert "documents selected" not in (d / "p2x1.log1").read_text()  # Process 0 logs alone.


def test_two_processes_of_four_devices_match_one_of_eight(setup):
  d, corpus = setup
  assert run(d, corpus, "p1x8", 1, 8) == run(d, corpus, "p2x4", 2, 4)


def test_kill_one_process_mid_scoring_then_resume(setup):
  d, corpus = setup
  reference = REFERENCE.get("2 devices") or run(d, corpus, "ref1x2", 1, 2)
  workdir = d / "killed"
  procs = launch(d, corpus, workdir, 2, 1)
  deadline = time.time() + 240
  seen = 0
  while time.time() < deadline and procs[1].poll() is None:
    cursors = list(pathlib.Path(f"{workdir}_cache").glob("scores/*/cursor.json"))
    try:
      seen = json.loads(cursors[0].read_text())["next_chunk"] if cursors else 0
    except (OSError, ValueError, KeyError):
      seen = 0
    if seen >= 2:
      break
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGKILL)
  procs[0].send_signal(signal.SIGKILL)  # It would wait for its peer in the next collective.
  for p in procs:
    p.wait(timeout=60)
  assert seen >= 2, "scoring never started"
  assert not (workdir / MANIFEST).exists()
  (cursor,) = pathlib.Path(f"{workdir}_cache").glob("scores/*/cursor.json")
  n_chunks = json.loads(cursor.read_text())["n_chunks"]
  stopped_at = json.loads(cursor.read_text())["next_chunk"]
  assert 2 <= stopped_at < n_chunks, "the kill came too late to test resuming"
  finish(launch(d, corpus, workdir, 2, 1), workdir)
  assert (workdir / MANIFEST).read_bytes() == reference
  assert json.loads(cursor.read_text())["done"]  # The rerun continued the same scores.


def test_kill_one_process_mid_bat_training_then_resume(setup):
  d, corpus = setup
  reference = d / "bat_ref"
  finish(launch(d, corpus, reference, 2, 1, BAT), reference)
  workdir = d / "bat_killed"
  procs = launch(d, corpus, workdir, 2, 1, BAT)
  ckpts = workdir / ADAPTER.parent / "checkpoints"
  deadline, step = time.time() + 240, 0
  while time.time() < deadline and procs[1].poll() is None and step < 2:
    step = max([int(p.name) for p in ckpts.glob("*") if p.name.isdigit()], default=0)
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGKILL)
  procs[0].send_signal(signal.SIGKILL)  # It would wait for its peer in the next collective.
  for p in procs:
    p.wait(timeout=60)
  assert step >= 2, "BAT training never checkpointed"
  assert not (workdir / ADAPTER).exists(), "the kill came too late to test resuming"
  finish(launch(d, corpus, workdir, 2, 1, BAT), workdir)
  a = safetensors.numpy.load_file(str(reference / ADAPTER))
  b = safetensors.numpy.load_file(str(workdir / ADAPTER))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  strip = lambda rs: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rs]  # noqa
  assert strip(io.read_jsonl(reference / ADAPTER.parent / "metrics.jsonl")) == strip(
      io.read_jsonl(workdir / ADAPTER.parent / "metrics.jsonl"))
