"""The user's path end to end (`configs/hf_lora.py`): a tiny Hugging Face Llama with a chat
template, chat task files (adapt / valid / test), a Parquet + JSONL.gz text pool; ALBAT's arms
choose their best step on the validation split, the test split is reported at that step, the
manifest carries ids / files / texts, and the PEFT adapters load in peft with jbat's logits."""

import gzip
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[hf]')")
peft = pytest.importorskip("peft", reason="peft not installed (pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from jbat import io, lora, train  # noqa: E402
from jbat.models import hf_io  # noqa: E402
from tests.test_formats import make_tokenizer  # noqa: E402
from tests.test_hf_io import TOL, llama_config, save_hf, torch_logits  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
A = [f"w{i}" for i in range(20, 28)]  # The task's response words (adapt and valid).
B = [f"w{i}" for i in range(30, 38)]  # The test split's response words: another task.


def chat(prompt: str, response: str) -> dict:
  return {"messages": [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": response}]}


def phrase(words: list[str], i: int, n: int = 5) -> str:
  return " ".join(words[(i * 3 + j * (1 + i % 3)) % len(words)] for j in range(n))


def write_jsonl(path: pathlib.Path, rows: list[dict], gz: bool = False) -> str:
  text = "".join(json.dumps(r) + "\n" for r in rows)
  if gz:
    with gzip.open(path, "wt") as f:
      f.write(text)
  else:
    path.write_text(text)
  return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  d = tmp_path_factory.mktemp("user")
  save_hf(llama_config(), d / "hf", tokenizer=make_tokenizer(chat=True))
  adapt = write_jsonl(d / "adapt.jsonl", [chat(f"w9 w{10 + i % 8}", phrase(A, i))
                                          for i in range(16)])
  valid = write_jsonl(d / "valid.jsonl", [chat(f"w9 w{10 + i % 8}", phrase(A, i + 16, 6))
                                          for i in range(8)])
  test = write_jsonl(d / "test.jsonl", [chat(f"w9 w{10 + i % 8}", phrase(B, i, 14))
                                        for i in range(8)])
  pq.write_table(pa.table({"text": [phrase(A if i % 2 else B, i + 40, 7) for i in range(20)]}),
                 d / "pool.parquet")
  write_jsonl(d / "pool.jsonl.gz", [{"text": phrase(A if i % 3 else B, i + 70, 8)}
                                    for i in range(20)], gz=True)
  wd = d / "run"
  rc = train.main([
      "jbat.train", "--config", str(ROOT / "configs/hf_lora.py"),
      f"--config.model.pretrained={d / 'hf'}",
      f"--config.data.adapt={adapt}", "--config.data.format=chat",
      f"--config.data.valid={valid}", f"--config.data.test={test}",
      f"--config.data.pool={d / 'pool.parquet'},{d / 'pool.jsonl.gz'}",
      "--config.data.max_len=24", "--config.seeds=0", "--config.train.steps=12",
      "--config.train.lr=0.06", "--config.train.eval_every=3", "--config.train.ckpt_every=6",
      "--config.train.batch_size=4", "--config.surrogate.steps=6", "--config.select.k=8",
      "--config.select.top_n=16", "--config.select.batch_size=8",
      # The toy pool is made of the task's 8 words: every text is a near-duplicate of a task
      # example by construction (tests/test_protocol.py covers the filter).
      "--config.data.near_dup=0",
      f"--config.workdir={wd}", f"--config.cache_dir={d / 'cache'}", "--config.progress=False"])
  return d, wd, rc


def test_cli_runs_and_reports_the_protocol(run):
  _, wd, rc = run
  assert rc == 0
  res = json.loads((wd / "results.json").read_text())
  assert set(res["arms"]) == {"none", "random", "albat"}
  assert res["protocol"]["best_step_chosen_on"] == "valid"
  assert res["n_valid"] == 8 and res["n_test"] == 8 and res["counts"]["pool"]["read"] == 40
  for arm in res["arms"].values():
    for seed, curve in enumerate(arm["curves"]):
      steps, nlls = zip(*curve)
      # The best step is the validation curve's minimum (the first, on ties).
      assert arm["best_step"][seed] == steps[int(np.argmin(nlls))]
      assert arm["best_nll"][seed] == min(nlls)
      assert np.isfinite(arm["test_nll_best"][seed]) and np.isfinite(arm["test_nll_final"][seed])
  assert res["arms"]["albat"]["precision"] is None  # No labels, no precision.
  report = (wd / "report.md").read_text()
  assert "validation" in report and "test NLL at best valid step" in report


def test_best_step_comes_from_valid_not_test(run):
  """Valid shares the adaptation set's responses, test has another task's: at this learning
  rate valid is best at an early step and worse later, while test keeps improving to the last
  step. The reported best step is valid's, and test's number is taken there, not at test's
  own best."""
  _, wd, _ = run
  res = json.loads((wd / "results.json").read_text())
  none = res["arms"]["none"]
  steps, nlls = zip(*none["curves"][0])
  assert none["best_step"][0] == steps[int(np.argmin(nlls))] < steps[-1]
  assert none["final_nll"][0] > none["best_nll"][0]  # Valid: the best step beats the last.
  assert none["test_nll_final"][0] < none["test_nll_best"][0]  # Test would pick the last.


def test_manifest_rows(run):
  d, wd, _ = run
  rows = io.read_jsonl(wd / "select/rel_loss_diff/selection/manifest.jsonl")
  assert len(rows) == 8
  assert [r["rank"] for r in rows] == list(range(1, 9))
  files = {str(d / "pool.parquet"), str(d / "pool.jsonl.gz")}
  for r in rows:
    assert {"id", "uid", "file", "row", "score", "rank", "text", "source"} <= set(r)
    assert r["file"] in files and r["uid"] == f"{r['file']}:{r['row']}"
    assert r["text"].startswith("w")


def test_peft_adapter_matches_jbat_logits(run):
  d, wd, _ = run
  run_dir = wd / "arms/albat/seed_0"
  for name in ("peft", "peft_best"):
    assert (run_dir / name / "adapter_config.json").exists()
  model, _ = hf_io.load_causal_lm(d / "hf")
  lora.apply_lora(model, lora.LoRAConfig(rank=8, alpha=16.0, targets=lora.DEFAULT_TARGETS),
                  rngs=nnx.Rngs(0))
  nnx.update(model, io.load_tree(run_dir / "adapter.safetensors",
                                 nnx.state(model, nnx.LoRAParam)))
  ids = np.random.default_rng(0).integers(4, 40, size=(2, 12))
  ours = np.asarray(model(jnp.asarray(ids)))
  base = transformers.AutoModelForCausalLM.from_pretrained(str(d / "hf"), local_files_only=True)
  theirs = torch_logits(peft.PeftModel.from_pretrained(base, str(run_dir / "peft")).eval(), ids)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=TOL)
  plain = torch_logits(
      transformers.AutoModelForCausalLM.from_pretrained(str(d / "hf")).eval(), ids)
  assert np.abs(plain - theirs).max() > 100 * TOL  # The adapter really changes the logits.


def test_python_api_select_and_adapt(run, tmp_path):
  """jbat.select / jbat.adapt on the same files, from a model folder, without the CLI."""
  import jbat
  d, _, _ = run
  sel = jbat.select(str(d / "hf"), None, str(d / "adapt.jsonl"), [
      {"text": phrase(A if i % 2 else B, i + 40, 7)} for i in range(12)], k=4, top_n=8,
      format="chat", max_len=24, surrogate_steps=4, lr=0.02, batch_size=8)
  assert len(sel.ids) == len(sel.scores) == len(sel.records) == 4
  assert sel.scores == sorted(sel.scores, reverse=True)
  assert all(i.startswith("pool:") for i in sel.ids)
  assert [r["uid"] for r in sel.rows] == sel.ids and all(r["text"] for r in sel.rows)
  model, fit = jbat.adapt(str(d / "hf"), None, str(d / "adapt.jsonl"), selection=sel,
                          valid=str(d / "valid.jsonl"), format="chat", max_len=24, steps=4,
                          lr=0.02, batch_size=4, eval_every=2)
  evals = [r for r in fit.history if "eval_loss" in r]
  assert fit.best_loss == min(r["eval_loss"] for r in evals) < evals[0]["eval_loss"]
  assert lora.count_params(model)["adapter"] > 0


@pytest.mark.parametrize("override,needle", [
    ("--config.arms=none,oracle", "oracle"),
    ("--config.data.valid=", "data.valid is required"),
])
def test_own_path_config_errors(run, tmp_path, capsys, override, needle):
  """Without labels there is no oracle arm; without a validation split nothing chooses the
  best step: both exit 2 before anything is written."""
  d, _, _ = run
  rc = train.main([
      "jbat.train", "--config", str(ROOT / "configs/hf_lora.py"),
      f"--config.model.pretrained={d / 'hf'}", f"--config.data.adapt={d / 'adapt.jsonl'}",
      "--config.data.format=chat", f"--config.data.valid={d / 'valid.jsonl'}",
      f"--config.data.pool={d / 'pool.parquet'}", override,
      f"--config.workdir={tmp_path / 'run'}", f"--config.cache_dir={tmp_path / 'cache'}"])
  assert rc == 2 and needle in capsys.readouterr().err
  assert not (tmp_path / "run").exists()
