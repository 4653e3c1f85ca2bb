"""colab/install.py installs jbat into an interpreter that already has jax and leaves jax alone.

The end-to-end test is offline: a fresh venv (no system site-packages) gets a fake "jax" and
"jaxlib" 0.4.99 (tiny wheels built here), then the install runs with `--no-index --find-links`
pointing at a folder that also offers jax/jaxlib 0.10.2, the versions the (fake) lock pins:
the runtime's jax must stay 0.4.99, byte for byte.
"""

import base64
import hashlib
import importlib.metadata
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("colab_install", ROOT / "colab" / "install.py")
install_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_lib)

LOCK = "absl-py==2.5.1\njax==0.10.2\njaxlib==0.10.2\n# a comment\nnumpy==2.4.6\n"


def test_plan_keeps_installed_jax_and_plugins():
  installed = {"jax": "0.4.99", "JAXlib": "0.4.99", "jax_cuda12_plugin": "0.4.99",
               "jax-cuda12-pjrt": "0.4.99", "libtpu": "0.0.1", "numpy": "1.0", "jaxtyping": "1"}
  reqs, constraints = install_lib.plan(LOCK, installed)
  assert reqs == ["absl-py==2.5.1", "numpy==2.4.6"]
  assert constraints == ["jax==0.4.99", "jax-cuda12-pjrt==0.4.99", "jax-cuda12-plugin==0.4.99",
                         "jaxlib==0.4.99", "libtpu==0.0.1"]


def test_plan_without_jax_installs_the_lock():
  reqs, constraints = install_lib.plan(LOCK, {"numpy": "1.0", "jaxlib": "0.4.99"})
  assert reqs == ["absl-py==2.5.1", "jax==0.10.2", "jaxlib==0.10.2", "numpy==2.4.6"]
  assert constraints == []


def test_plan_rejects_unpinned_lines():
  with pytest.raises(ValueError, match="name==version"):
    install_lib.plan("jax>=0.4\n", {})


def write_wheel(folder: pathlib.Path, name: str, version: str, requires=()) -> pathlib.Path:
  """A minimal pure-Python wheel: package `name` whose __init__ records its version."""
  files = {f"{name}/__init__.py": f"__version__ = {version!r}\nFAKE = True\n",
           f"{name}-{version}.dist-info/METADATA": "".join(
               [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                *(f"Requires-Dist: {r}\n" for r in requires)]),
           f"{name}-{version}.dist-info/WHEEL": (
               "Wheel-Version: 1.0\nGenerator: jbat-test\nRoot-Is-Purelib: true\n"
               "Tag: py3-none-any\n")}
  record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},{len(text.encode())}"
            for path, text in files.items()]
  files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(
      [*record, f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
  path = folder / f"{name}-{version}-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as z:
    for arcname, text in files.items():
      z.writestr(arcname, text)
  return path


def repack_installed(folder: pathlib.Path, name: str) -> pathlib.Path:
  """A wheel of the distribution `name` as this interpreter has it installed (for an offline
  build backend: the venv's bundled setuptools cannot build wheels without `wheel`)."""
  dist = importlib.metadata.distribution(name)
  files = [f for f in dist.files if not str(f).startswith("..") and "__pycache__" not in str(f)]
  path = folder / f"{name}-{dist.version}-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as z:
    for f in files:
      z.write(f.locate(), str(f))
  return path


def run_py(python: pathlib.Path, code: str) -> str:
  """stdout of `python -c code`, run outside the checkout (`-c` puts the cwd on sys.path)."""
  return subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True,
                        cwd=python.parents[2]).stdout.strip()


def test_install_leaves_the_runtime_jax_alone(tmp_path, monkeypatch):
  monkeypatch.delenv("PYTHONPATH", raising=False)  # The venv sees only what is installed in it.
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  for name in ("jax", "jaxlib"):
    write_wheel(wheels, name, "0.4.99")
    write_wheel(wheels, name, "0.10.2")  # What the lock pins: on offer, must not be taken.
  write_wheel(wheels, "jbatfakedep", "1.0", requires=["jax>=0.4"])
  write_wheel(wheels, "needsnewjax", "1.0", requires=["jax>=0.10"])
  setuptools = importlib.metadata.version("setuptools")
  repack_installed(wheels, "setuptools")
  offline = ["--no-index", "--find-links", str(wheels)]

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = venv / "bin" / "python"
  subprocess.run([str(python), "-m", "pip", "install", "-q", *offline, "jax==0.4.99",
                  "jaxlib==0.4.99", f"setuptools=={setuptools}"], check=True)
  jax_init = pathlib.Path(run_py(python, "import jax; print(jax.__file__)"))
  jax_bytes = jax_init.read_bytes()

  # A copy of the package (what an editable install needs) with a small offline lock.
  repo = tmp_path / "repo"
  repo.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, repo / name)
  shutil.copytree(ROOT / "jbat", repo / "jbat", ignore=shutil.ignore_patterns("__pycache__"))

  # A requirement that needs another jax: pip stops instead of replacing the runtime's.
  (repo / "requirements.lock").write_text("jax==0.10.2\njaxlib==0.10.2\nneedsnewjax==1.0\n")
  with pytest.raises(subprocess.CalledProcessError):
    install_lib.install(repo, python=str(python), pip_args=offline)
  assert run_py(python, "import jax; print(jax.__version__)") == "0.4.99"

  (repo / "requirements.lock").write_text("jax==0.10.2\njaxlib==0.10.2\njbatfakedep==1.0\n")
  install_lib.install(repo, python=str(python), pip_args=offline)
  versions = install_lib.installed_versions(str(python))
  assert {n: versions.get(n) for n in ("jax", "jaxlib", "jbatfakedep", "jbat")} == {
      "jax": "0.4.99", "jaxlib": "0.4.99", "jbatfakedep": "1.0", "jbat": "0.1.0"}
  assert "needsnewjax" not in versions
  assert jax_init.read_bytes() == jax_bytes
  # jbat is importable from the checkout it was installed from (an editable install).
  assert run_py(python, "import jbat; print(jbat.__file__)") == str(repo / "jbat" / "__init__.py")
  # The `jbat` console script (pyproject's [project.scripts]) calls the CLI's main.
  script = (venv / "bin" / "jbat").read_text()
  assert "from jbat.train import main" in script
