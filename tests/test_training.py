"""The training loop: only the adapter moves, resume is bitwise, 1 device == 8 devices."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jbat import io, lora
from jbat.data import pipeline
from jbat.data.tokenizer import train_bpe_tokenizer
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.training import loop
from tests import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LEN = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("train")
  texts = [x["text"] for x in synthetic.documents(20)]
  tok = train_bpe_tokenizer(texts, 300, d / "tokenizer.json")
  from jbat.data.sources import Document
  docs = [Document(id=i, text=t, source="t") for i, t in enumerate(texts)]
  examples = pipeline.encode(docs, tok, MAX_LEN)
  cfg = LMConfig(vocab_size=len(tok), max_len=MAX_LEN, d_model=32, n_layers=2, n_heads=2,
                 d_ff=64)
  return tok, examples, cfg


def lora_model(cfg, seed=0):
  model = CausalLM(cfg, rngs=nnx.Rngs(seed))
  lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(seed + 1))
  return model


def spec(**kw):
  base = dict(steps=8, lr=1e-2, warmup_steps=2, ckpt_every=4, eval_every=4, log_every=1, seed=0)
  base.update(kw)
  return loop.TrainSpec(**base)


def loader(setup, seed=0):
  tok, examples, _ = setup
  return pipeline.train_loader(examples, 8, MAX_LEN, tok.pad_token_id, seed)


def evals(setup):
  tok, examples, _ = setup
  return lambda: pipeline.eval_batches(examples[:20], 8, MAX_LEN, tok.pad_token_id)


def test_only_adapter_changes_and_loss_drops(setup, tmp_path):
  model = lora_model(setup[2])
  before = io.tree_to_flat(nnx.state(model, nnx.Not(nnx.LoRAParam)))
  res = loop.fit(model, nnx.LoRAParam, loader(setup), spec(steps=12), tmp_path,
                 eval_batches=evals(setup), progress=False)
  nnx.update(model, res.params)
  after = io.tree_to_flat(nnx.state(model, nnx.Not(nnx.LoRAParam)))
  assert before.keys() == after.keys()
  for k in before:
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  adapter = io.tree_to_flat(res.params)
  assert any(k.endswith("lora_b") and np.abs(v).max() > 0 for k, v in adapter.items())
  ev = [r["eval_loss"] for r in res.history if "eval_loss" in r]
  assert res.best_loss == min(ev) and res.best_loss < ev[0]
  # metrics.jsonl holds exactly the history, and best.safetensors the best params.
  assert io.read_jsonl(tmp_path / "metrics.jsonl") == res.history
  assert res.best_params is not None


class Interrupt(Exception):
  pass


class StopAfter:
  """Wraps a grain iterator; raises after `n` batches, like a crash mid-run."""

  def __init__(self, it, n):
    self.it, self.n = it, n

  def __next__(self):
    if self.n == 0:
      raise Interrupt
    self.n -= 1
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def test_resume_is_bitwise_identical(setup, tmp_path):
  straight = loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup), spec(), tmp_path / "a",
                      eval_batches=evals(setup), progress=False)
  with pytest.raises(Interrupt):
    loop.fit(lora_model(setup[2]), nnx.LoRAParam, StopAfter(loader(setup), 5), spec(),
             tmp_path / "b", eval_batches=evals(setup), progress=False)
  resumed = loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup), spec(), tmp_path / "b",
                     eval_batches=evals(setup), progress=False)
  a, b = io.tree_to_flat(straight.params), io.tree_to_flat(resumed.params)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert straight.history == resumed.history or [
      {k: v for k, v in r.items() if k != "examples_per_s"} for r in straight.history] == [
      {k: v for k, v in r.items() if k != "examples_per_s"} for r in resumed.history]
  assert straight.best_step == resumed.best_step


def test_fit_until_then_continue_equals_straight(setup, tmp_path):
  """BAT re-selection trains in phases: fit(until=t), then fit again with a new iterator; with
  the same data this is bitwise the straight run (one schedule over all steps)."""
  straight = loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup), spec(), tmp_path / "a",
                      eval_batches=evals(setup), progress=False)
  first = loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup), spec(), tmp_path / "b",
                   eval_batches=evals(setup), progress=False, until=3)
  assert max(r["step"] for r in first.history) == 3
  again = loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup), spec(), tmp_path / "b",
                   eval_batches=evals(setup), progress=False, until=3)  # Already there.
  for k, v in io.tree_to_flat(first.params).items():
    np.testing.assert_array_equal(v, io.tree_to_flat(again.params)[k], err_msg=k)
  rest = loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup), spec(), tmp_path / "b",
                  eval_batches=evals(setup), progress=False)
  a, b = io.tree_to_flat(straight.params), io.tree_to_flat(rest.params)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  strip = lambda h: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in h]  # noqa: E731
  assert strip(straight.history) == strip(rest.history)
  assert (straight.best_step, straight.best_loss) == (rest.best_step, rest.best_loss)
  with pytest.raises(ValueError, match="until"):
    loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup), spec(), tmp_path / "c",
             progress=False, until=9)


MULTI = textwrap.dedent("""
    import sys, pathlib, json
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from flax import nnx
    from jbat import io
    from jbat.training import loop
    from tests import test_training as t
    from jbat.data.tokenizer import load_tokenizer
    from jbat.data import pipeline
    from jbat.data.sources import Document
    from tests import synthetic
    tok = load_tokenizer({tok!r})
    texts = [x["text"] for x in synthetic.documents(20)]
    docs = [Document(id=i, text=s, source="t") for i, s in enumerate(texts)]
    ex = pipeline.encode(docs, tok, t.MAX_LEN)
    from jbat.models.causal_lm import LMConfig
    cfg = LMConfig(vocab_size=len(tok), max_len=t.MAX_LEN, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    res = loop.fit(t.lora_model(cfg), nnx.LoRAParam,
                   pipeline.train_loader(ex, 8, t.MAX_LEN, tok.pad_token_id, 0), t.spec(),
                   pathlib.Path({out!r}), progress=False)
    io.save_tree(res.params, pathlib.Path({out!r}) / "final.safetensors")
    # Stopped at step 3 and resumed from that checkpoint on the same mesh (the optimizer state
    # must come back on the mesh's devices).
    for until in (3, None):
      res = loop.fit(t.lora_model(cfg), nnx.LoRAParam,
                     pipeline.train_loader(ex, 8, t.MAX_LEN, tok.pad_token_id, 0), t.spec(),
                     pathlib.Path({out!r}) / "resumed", progress=False, until=until)
    io.save_tree(res.params, pathlib.Path({out!r}) / "resumed.safetensors")
    print("DEVICES", jax.device_count())
""")


def run_devices(n, tok_path, out):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             JAX_PLATFORMS="cpu")
  code = MULTI.format(root=str(ROOT), tok=str(tok_path), out=str(out))
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"DEVICES {n}" in r.stdout
  final = safetensors.numpy.load_file(str(out / "final.safetensors"))
  resumed = safetensors.numpy.load_file(str(out / "resumed.safetensors"))
  for k in final:
    np.testing.assert_array_equal(final[k], resumed[k], err_msg=f"resume on {n} devices: {k}")
  return final


def test_one_device_equals_eight(setup, tmp_path):
  """Also: on 1 and on 8 devices, a run stopped and resumed is bitwise the straight run."""
  tok = setup[0]
  tok_path = tmp_path / "tok"
  tok.save_pretrained(tok_path)
  one = run_devices(1, tok_path, tmp_path / "one")
  eight = run_devices(8, tok_path, tmp_path / "eight")
  for k in one:
    np.testing.assert_allclose(one[k], eight[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_early_stopping_on_validation_patience(setup, tmp_path):
  """patience=3: with lr 0 the held-out loss never improves after step 0, so training stops at
  the third evaluation without a new best (step 3 of 20), keeps step 0 as best, and a later
  call trains no further; with a learning rate that helps, it runs all its steps."""
  res = loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup),
                 spec(steps=20, lr=0.0, eval_every=1, patience=3), tmp_path / "a",
                 eval_batches=evals(setup), progress=False)
  assert res.stopped_step == 3 and res.best_step == 0
  assert max(r["step"] for r in res.history) == 3
  assert [r["step"] for r in res.history if "eval_loss" in r] == [0, 1, 2, 3]
  assert any(r.get("stopped_early") for r in res.history)
  again = loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup),
                   spec(steps=20, lr=0.0, eval_every=1, patience=3), tmp_path / "a",
                   eval_batches=evals(setup), progress=False)
  assert again.stopped_step == 3 and max(r["step"] for r in again.history) == 3
  ran = loop.fit(lora_model(setup[2]), nnx.LoRAParam, loader(setup), spec(patience=2),
                 tmp_path / "b", eval_batches=evals(setup), progress=False)
  assert ran.stopped_step is None and max(r["step"] for r in ran.history) == 8
