"""Config validation and the CLI's handling of bad configs (exit 2, field named, nothing written)."""

import pathlib
import subprocess
import sys

import ml_collections
import pytest

from jbat import config as config_lib
from jbat.errors import JbatError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def demo(arg=None):
  sys.path.insert(0, str(ROOT))
  from configs import demo as demo_cfg
  return demo_cfg.get_config(arg)


def test_demo_configs_validate():
  config_lib.validate(demo())
  config_lib.validate(demo("tiny"))


@pytest.mark.parametrize("key,value,needle", [
    ("lora.rank", 0, "lora.rank must be > 0"),
    ("data.n_adapt", 0, "data.n_adapt must be > 0"),
    ("train.steps", -1, "train.steps must be > 0"),
    ("model.pos", "alibi", "model.pos must be one of"),
    ("data.source", "hub", "data.source must be one of"),
    ("arms", "none,magic", "unknown arm 'magic'"),
    ("lora.targets", "(", "lora.targets is not a valid regex"),
    ("select.less_batch_size", -8, "select.less_batch_size must be >= 0"),
])
def test_bad_values_name_the_field(key, value, needle):
  c = demo()
  section, _, name = key.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(JbatError, match=needle.replace("(", r"\(")):
    config_lib.validate(c)


def test_unknown_key_and_wrong_type():
  c = demo()
  c.unlock()
  c.train.stepz = 3
  with pytest.raises(JbatError, match="unknown key 'train.stepz'"):
    config_lib.validate(c)
  d = demo().to_dict()
  d["train"]["steps"] = "ten"
  c = ml_collections.ConfigDict(d)
  with pytest.raises(JbatError, match="train.steps must be int"):
    config_lib.validate(c)


def test_missing_path(tmp_path):
  c = demo()
  c.data.source = "jsonl"
  c.data.path = str(tmp_path / "nope.jsonl")
  with pytest.raises(JbatError, match="data.path: file .*nope.jsonl.* does not exist"):
    config_lib.validate(c)
  c.data.source = "text_folder"
  c.data.path = str(tmp_path / "missing_dir")
  with pytest.raises(JbatError, match="data.path: folder .*missing_dir.* does not exist"):
    config_lib.validate(c)


def test_fingerprint_ignores_non_semantic_keys():
  a, b = demo(), demo()
  b.workdir, b.progress = "/elsewhere", False
  assert config_lib.fingerprint(a) == config_lib.fingerprint(b)
  b.train.lr = 1e-3
  assert config_lib.fingerprint(a) != config_lib.fingerprint(b)


def test_workdir_of_another_config_is_refused(tmp_path):
  a = demo()
  a.workdir = str(tmp_path / "run")
  config_lib.prepare_workdir(a)
  config_lib.prepare_workdir(a)  # Same config: fine (resume).
  b = demo()
  b.workdir = a.workdir
  b.lora.rank = 4
  with pytest.raises(JbatError, match="different config"):
    config_lib.prepare_workdir(b)


def run_cli(*args, cwd):
  return subprocess.run([sys.executable, "-m", "jbat.train", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120,
                        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("override,needle", [
    ("--config.lora.rank=0", "lora.rank must be > 0"),
    ("--config.train.stepz=5", "stepz"),
    ("--config.train.steps=abc", "train.steps"),
    ("--config.data.source=jsonl", "data.path is required"),
])
def test_cli_config_errors_exit_2_and_write_nothing(tmp_path, override, needle):
  wd = tmp_path / "wd"
  r = run_cli("--config", str(ROOT / "configs/demo.py"), f"--config.workdir={wd}", override,
              cwd=tmp_path)
  assert r.returncode == 2, r.stderr
  assert needle in r.stderr
  assert "Traceback" not in r.stderr
  assert not wd.exists()


def test_cli_missing_config_file(tmp_path):
  r = run_cli("--config", str(tmp_path / "nope.py"), cwd=tmp_path)
  assert r.returncode == 2
  assert "nope.py" in r.stderr
