"""The personalization report: image grids, the summary over seeds and report.md."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from jbat import io
from jbat import report as report_lib
from jbat.diffusion.schema import METRICS


def grid(x: np.ndarray, cols: int) -> np.ndarray:
  """Tiles images f32[N, S, S, 1] into one f32[rows*(S+1)+1, cols*(S+1)+1] (1-px borders)."""
  n, s = len(x), x.shape[1]
  rows = -(-n // cols)
  out = np.full((rows * (s + 1) + 1, cols * (s + 1) + 1), -1.0, np.float32)
  for i in range(n):
    r, c = divmod(i, cols)
    out[1 + r * (s + 1):1 + r * (s + 1) + s, 1 + c * (s + 1):1 + c * (s + 1) + s] = x[i, ..., 0]
  return out


def save_grid(path: pathlib.Path, x: np.ndarray, cols: int) -> None:
  """Writes a PNG of `grid(x, cols)` (values in [-1, 1], grey scale, upscaled 4x)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  g = np.kron(np.clip(grid(x, cols), -1, 1), np.ones((4, 4), np.float32))
  path.parent.mkdir(parents=True, exist_ok=True)
  with io.atomic_path(path) as tmp:
    plt.imsave(str(tmp), g, cmap="gray", vmin=-1.0, vmax=1.0, format="png")


def save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  """np.save, atomically (an interrupted write leaves no truncated file)."""
  with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.save(f, array)


def fmt(x: float) -> str:
  """The number format of report.md (results.json holds the full values)."""
  return f"{x:.4f}"


def summarize(per_run: dict[str, dict[int, dict[str, Any]]], seeds: list[int]
              ) -> dict[str, Any]:
  """Per arm: metric lists in seed order, and paired differences vs none / random / prior."""
  arms = {a: {m: [per_run[a][s][m] for s in seeds] for m in METRICS} for a in per_run}
  paired: dict[str, Any] = {}
  for a in arms:
    for ref in ("none", "random", "prior"):
      if ref in arms and ref != a:
        paired.setdefault(a, {})[ref] = {
            m: report_lib.paired_interval([x - y for x, y in zip(arms[a][m], arms[ref][m])])
            for m in METRICS}
  return {"arms": arms, "paired": paired}


def render_report(results: dict[str, Any]) -> str:
  """report.md from results.json's numbers (so the two always agree)."""
  s = results["summary"]
  lines = [f"# Personalization: {results['task']['description']}", "",
           (f"Seeds {results['seeds']} (paired across arms); every arm ran "
            f"{results['train_steps']} steps. Backbone: {results['backbone']['note']}. "
            f"Classifier test accuracy {fmt(results['classifier']['test_accuracy'])}."), "",
           ("Metrics: fidelity = held-out subject denoising loss with \"[V] <class>\" (lower "
            "better); drift = class-image denoising loss after - before (lower better); "
            "class_frac = fraction of \"[V] <class>\" samples classified as the class (higher "
            "better); embed_dist = 1 - mean cosine similarity of sample and held-out subject "
            "classifier embeddings (lower better)."), "",
           "| arm | fidelity | drift | class_frac | embed_dist |", "|---|---|---|---|---|"]
  b = results["backbone_metrics"]
  lines.append(f"| backbone (before) | {fmt(b['fidelity'])} | {fmt(0.0)} | "
               f"{fmt(b['class_frac'])} | {fmt(b['embed_dist'])} |")
  for arm, m in s["arms"].items():
    lines.append(f"| {arm} | " + " | ".join(report_lib.mean_sd(m[k]) for k in METRICS) + " |")
  lines += ["", "Paired differences (arm - reference, mean [95% t-interval] over seeds):", "",
            "| arm | vs | fidelity | drift | class_frac | embed_dist |",
            "|---|---|---|---|---|---|"]
  for arm, refs in s["paired"].items():
    for ref, st in refs.items():
      cells = " | ".join(report_lib.interval(st[k]) for k in METRICS)
      lines.append(f"| {arm} | {ref} | {cells} |")
  al = results.get("albat")
  if al:
    lines += ["", f"ALBAT: score `{al['score']}` ({al['cond']} prompt), rule `{al['rule']}` "
              f"(tau {al['tau']}, top_n {al['top_n']}), k = {al['k']} of a pool of "
              f"{al['pool_size']}; class precision of the picks per seed: "
              + ", ".join(fmt(p) for p in al["precision"])
              + f" (pool base rate {fmt(al['base_rate'])}); picks of seed "
              f"{results['seeds'][0]} by class: "
              + ", ".join(f"{c} {n}" for c, n in al["picks_per_class"].items()) + "."]
  lines += ["", "## Samples", "", "Subject images (top: adaptation set, below: held out):", "",
            "![subject](grids/subject.png)", "",
            "Backbone, prompt \"<class>\":", "", "![backbone](grids/backbone.png)", ""]
  for arm in s["arms"]:
    lines += [f"{arm} (\"[V] <class>\", one row per seed):", "", f"![{arm}](grids/{arm}.png)",
              ""]
  t = results["timings_s"]
  lines += ["## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in t.items()), ""]
  return "\n".join(lines)
