"""Installs jbat into a Python that already has its own jax (Colab, Kaggle, a cluster image).

  python colab/install.py [REPO_DIR] [-- extra pip arguments]

Such runtimes ship a jax/jaxlib built for their accelerator (CUDA, TPU). Installing
`requirements.lock` as it is would replace them with the CPU jaxlib it pins. This script keeps
them:

  1. it reads the installed versions of jax, jaxlib and the accelerator plugins (jax-cuda*,
     jax-rocm*, libtpu) from the target interpreter;
  2. it installs `requirements.lock` without those lines, under a constraints file that pins
     each installed one to its version, so no other requirement can upgrade or replace it
     (if one needs another jax, pip stops with a conflict instead);
  3. it installs jbat itself with `--no-deps -e REPO_DIR` (with the runtime's setuptools where
     it can, else with pip's isolated build).

Where no jax is installed, the lock's own jax and jaxlib (CPU) are installed. The colab notebook
runs `python colab/install.py /content/jbat`; tests/test_notebook.py runs `install` against a
throwaway venv with a fake jax and checks that it is left as it was.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence

# Distributions the runtime owns: never installed over, pinned to what is there.
KEEP_EXACT = ("jax", "jaxlib")
KEEP_PREFIXES = ("jax-cuda", "jax-rocm", "libtpu")

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def normalize(name: str) -> str:
  """The PEP 503 form of a distribution name: lower case, runs of -_. as one '-'."""
  return re.sub(r"[-_.]+", "-", name).lower()


def is_kept(name: str) -> bool:
  """Whether `name` is jax, jaxlib or an accelerator plugin of jax."""
  n = normalize(name)
  return n in KEEP_EXACT or n.startswith(KEEP_PREFIXES)


def plan(lock_text: str, installed: dict[str, str]) -> tuple[list[str], list[str]]:
  """(requirement lines, constraint lines) for a lock file and the target's installed dists.

  `installed` maps distribution names to versions. Kept distributions that are installed are
  dropped from the requirements and pinned in the constraints; where jax is not installed at
  all, the lock's jax lines stay (a fresh environment gets the lock's CPU jax).
  """
  kept = {normalize(n): v for n, v in installed.items() if is_kept(n)}
  has_jax = "jax" in kept
  reqs = []
  for line in lock_text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    m = _REQ.match(line)
    if m is None:
      raise ValueError(f"requirements.lock: expected 'name==version', got {line!r}")
    if has_jax and is_kept(m.group(1)):
      continue
    reqs.append(line)
  # Without jax the runtime has no accelerator build to keep: the lock decides everything.
  constraints = [f"{n}=={v}" for n, v in sorted(kept.items())] if has_jax else []
  return reqs, constraints


def installed_versions(python: str) -> dict[str, str]:
  """{distribution name: version} of everything installed in the interpreter `python`."""
  code = ("import importlib.metadata as m, json; print(json.dumps("
          "{d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))")
  # -P: the working directory (perhaps a checkout) is not put on the path.
  out = subprocess.run([python, "-P", "-c", code], check=True, capture_output=True, text=True)
  return json.loads(out.stdout)


def install(repo: str | pathlib.Path, *, python: str = sys.executable,
            pip_args: Sequence[str] = (), lock: str | pathlib.Path | None = None) -> None:
  """Installs jbat from the checkout `repo` into `python`, keeping its jax (see the module doc).

  pip_args go to every pip call (e.g. `--no-index --find-links DIR` offline). Raises
  subprocess.CalledProcessError when pip fails, e.g. when a requirement needs another jax.
  """
  repo = pathlib.Path(repo).resolve()
  lock = pathlib.Path(lock) if lock else repo / "requirements.lock"
  before = installed_versions(python)
  reqs, constraints = plan(lock.read_text(), before)
  pip = [python, "-m", "pip", "install", "-q", *pip_args]
  kept = ", ".join(constraints) or "none installed: the lock's CPU jax"
  print(f"jbat install: keeping {kept}", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    req_file = pathlib.Path(tmp) / "requirements.txt"
    con_file = pathlib.Path(tmp) / "constraints.txt"
    req_file.write_text("\n".join(reqs) + "\n")
    con_file.write_text("\n".join(constraints) + "\n")
    subprocess.run([*pip, "-r", str(req_file), "-c", str(con_file)], check=True)
  # The runtime's setuptools builds jbat where it can (no download); else pip's isolated build.
  editable = [*pip, "--no-deps", "-e", str(repo)]
  if subprocess.run([*editable, "--no-build-isolation"]).returncode != 0:
    subprocess.run(editable, check=True)
  after = installed_versions(python)
  names = [c.split("==")[0] for c in constraints]
  changed = [f"{n} {_lookup(before, n)} -> {_lookup(after, n)}" for n in names
             if _lookup(after, n) != _lookup(before, n)]
  if changed:  # pip honours constraints; this is a last check that nothing slipped through.
    raise RuntimeError(f"jbat install: these changed during the install: {changed}")
  print("jbat install: done (restart the runtime if pip replaced a package it had imported)",
        flush=True)


def _lookup(versions: dict[str, str], name: str) -> str | None:
  """The version of `name` in `versions`, matching names by their normalized form."""
  for n, v in versions.items():
    if normalize(n) == normalize(name):
      return v
  return None


def main(argv: Sequence[str]) -> int:
  args = list(argv)
  pip_args = args[args.index("--") + 1:] if "--" in args else []
  args = args[:args.index("--")] if "--" in args else args
  repo = args[0] if args else pathlib.Path(__file__).resolve().parents[1]
  install(repo, pip_args=pip_args)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
