"""Task metrics on the own-data path at tiny size: a tiny Hugging Face Llama with a chat
template, an oracle file (data.oracle), greedy answers to the test prompts at the best
validation step scored by ROUGE-L / exact match per arm and seed, paired statistics and sample
answers in report.md."""

import json
import pathlib

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch", reason="torch not installed (pip install -e '.[hf]')")
pytest.importorskip("rouge_score", reason="rouge-score not installed (requirements.lock)")

from jbat import config as config_lib, experiment, metrics, train  # noqa: E402
from jbat.data import splits  # noqa: E402
from jbat.models import generate as generate_lib, hf_io  # noqa: E402
from tests.test_formats import make_tokenizer  # noqa: E402
from tests.test_hf_io import llama_config, save_hf  # noqa: E402
from tests.test_user_path import chat, phrase, write_jsonl  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
A = [f"w{i}" for i in range(20, 28)]
B = [f"w{i}" for i in range(30, 38)]


def task_files(d: pathlib.Path) -> dict[str, str]:
  save_hf(llama_config(), d / "hf", tokenizer=make_tokenizer(chat=True))
  return {
      "adapt": write_jsonl(d / "adapt.jsonl", [chat(f"w9 w{10 + i % 8}", phrase(A, i, 4))
                                               for i in range(12)]),
      "valid": write_jsonl(d / "valid.jsonl", [chat(f"w9 w{10 + i % 8}", phrase(A, i + 12, 4))
                                               for i in range(4)]),
      "test": write_jsonl(d / "test.jsonl", [chat(" ".join(["w9"] + B[:1 + i % 3]),
                                                  phrase(A, i + 20, 4)) for i in range(5)]),
      "pool": write_jsonl(d / "pool.jsonl", [{"text": phrase(B, i, 6)} for i in range(16)]),
      "oracle": write_jsonl(d / "oracle.jsonl", [{"text": phrase(A, i + 40, 6)}
                                                 for i in range(6)])}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  d = tmp_path_factory.mktemp("task_eval")
  f = task_files(d)
  wd = d / "run"
  rc = train.main([
      "jbat.train", "--config", str(ROOT / "configs/hf_lora.py"),
      f"--config.model.pretrained={d / 'hf'}", "--config.data.format=chat",
      f"--config.data.adapt={f['adapt']}", f"--config.data.valid={f['valid']}",
      f"--config.data.test={f['test']}", f"--config.data.pool={f['pool']}",
      f"--config.data.oracle={f['oracle']}", "--config.arms=none,oracle",
      "--config.data.max_len=24", "--config.seeds=0,1", "--config.train.steps=4",
      "--config.train.lr=0.05", "--config.train.eval_every=2", "--config.train.ckpt_every=4",
      "--config.train.batch_size=4", "--config.select.k=4", "--config.eval.generate=True",
      "--config.eval.max_new_tokens=5", "--config.eval.batch_size=2", "--config.eval.at=best,final",
      "--config.eval.n_examples=2", f"--config.workdir={wd}",
      f"--config.cache_dir={d / 'cache'}", "--config.progress=False"])
  return d, wd, rc


def test_answers_scored_per_arm_and_seed(run):
  _, wd, rc = run
  assert rc == 0
  res = json.loads((wd / "results.json").read_text())
  assert set(res["arms"]) == {"none", "oracle"}
  assert res["arms"]["oracle"]["n_selected"] == 4
  for name, arm in res["arms"].items():
    for at in ("best", "final"):
      assert len(arm[f"test_rouge_l_{at}"]) == 2
      assert all(0.0 <= x <= 1.0 for x in arm[f"test_rouge_l_{at}"])
      assert len(arm[f"answers_{at}"]) == 2
    # The stored score is the mean of the per-answer scores written beside the adapter.
    for seed in (0, 1):
      rows = [json.loads(x) for x in
              (wd / "arms" / name / f"seed_{seed}" / "answers_best.jsonl").read_text().splitlines()]
      assert len(rows) == 5
      assert arm["test_rouge_l_best"][seed] == pytest.approx(
          np.mean([metrics.rouge_l(r["answer"], r["reference"]) for r in rows]))
      assert arm["test_exact_match_best"][seed] == pytest.approx(
          np.mean([metrics.exact_match(r["answer"], r["reference"]) for r in rows]))
      saved = json.loads((wd / "arms" / name / f"seed_{seed}" / "test_metrics.json").read_text())
      assert saved["test_rouge_l_best"] == arm["test_rouge_l_best"][seed]
      assert saved["test_nll_best"] == arm["test_nll_best"][seed]
    # The backbone's test NLL is one number (evaluated once), its adapted NLLs differ by seed.
    assert arm["test_nll_backbone"] == [res["arms"]["none"]["test_nll_backbone"][0]] * 2
  s = res["task_stats"]["oracle"]["test_rouge_l_best_vs_none"]
  diffs = np.subtract(res["arms"]["oracle"]["test_rouge_l_best"],
                      res["arms"]["none"]["test_rouge_l_best"])
  assert s["n"] == 2 and s["mean"] == pytest.approx(diffs.mean())
  assert s["lo"] <= s["mean"] <= s["hi"]
  report = (wd / "report.md").read_text()
  assert "ROUGE-L" in report and "beside the reference" in report
  assert res["arms"]["none"]["answers_best"][0]["reference"] in report


def test_batched_answers_equal_one_prompt_at_a_time(run):
  """Padding prompts of different lengths into fixed-shape batches changes no greedy answer;
  each prompt is the chat template's rendering up to the assistant turn, a prefix of the
  encoded training conversation."""
  d, _, _ = run
  f = task_files(d / "again")
  c = config_lib.load_config_file(ROOT / "configs/hf_lora.py")
  c.data.format, c.data.adapt, c.data.valid, c.data.test = "chat", f["adapt"], "", f["test"]
  c.data.max_len, c.eval.max_new_tokens, c.eval.batch_size = 24, 6, 4
  model, tok = hf_io.load_causal_lm(d / "again" / "hf")
  recs = splits.load_task(c.data, 0)
  prompts = experiment.generation_prompts(recs.test, c, tok)
  assert len({len(p) for p, _ in prompts}) > 1  # Different lengths: padding is exercised.
  enc, _ = splits.encode_task(recs.test, c.data, tok, c.data.max_len)
  assert len(enc) == len(recs.test) == len(prompts)
  for (ids, ref), ex, r in zip(prompts, enc, recs.test):
    assert list(ex["ids"][:len(ids)]) == ids
    assert ref == r.fields["messages"][-1]["content"]
  batched = experiment.generate_texts(model, [p for p, _ in prompts], c, tok)
  one_per_length = {len(ids): (ids, text) for (ids, _), text in zip(prompts, batched)}
  for ids, text in one_per_length.values():
    out, n = generate_lib.generate(model, np.asarray([ids]), max_new_tokens=6,
                                   eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    one = [t for t in np.asarray(out)[0, :int(n[0])].tolist() if t != tok.eos_token_id]
    assert text == tok.decode(one, skip_special_tokens=True).strip()
