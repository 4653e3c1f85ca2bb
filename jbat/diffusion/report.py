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


METRIC_NAMES = {"subject_fid": "subject fidelity", "prompt_fid": "prompt fidelity",
                "class_pres": "class preservation", "diversity": "diversity",
                "frechet": "Frechet distance", "loss_fid": "subject loss", "drift": "drift"}


# The references every arm is paired with (those the run has), in the tables' order.
PAIRED_REFS = ("none", "random", "oracle", "prior", "less", "backbone")


def summarize(per_run: dict[str, dict[str, dict[str, Any]]], units: list[str],
              backbone_runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Per arm: metric lists in unit order (unit = "<subject>/<seed>"), the backbone's values
  for the same units (drift 0 by definition), and paired differences (over units) vs each
  of PAIRED_REFS the run has."""
  arms = {a: {m: [per_run[a][u][m] for u in units] for m in METRICS} for a in per_run}
  bb = {m: [0.0 if m == "drift" else backbone_runs[u.rsplit("/", 1)[0]][m] for u in units]
        for m in METRICS}
  refs = {**arms, "backbone": bb}
  paired: dict[str, Any] = {}
  for a in arms:
    for ref in PAIRED_REFS:
      if ref in refs and ref != a:
        paired.setdefault(a, {})[ref] = {
            m: report_lib.paired_interval([x - y for x, y in zip(arms[a][m], refs[ref][m])])
            for m in METRICS}
  return {"arms": arms, "backbone": bb, "paired": paired}


def metric_tables(results: dict[str, Any]) -> list[str]:
  """The metric definitions, the per-arm table (mean ± sd over units) and the paired
  differences (report.md and docs/results.md, from results.json's summary)."""
  s = results["summary"]
  lines = [("Embeddings: the held-out classifier's (L2-normalised penultimate layer). subject "
            "fidelity = mean cosine of \"[V] <class>\" samples to the subject's test images "
            "(higher better); prompt fidelity = fraction of those samples classified as the "
            "class; class preservation = fraction of \"<class>\" samples classified as the "
            "class; diversity = mean pairwise embedding distance of the \"<class>\" samples; "
            "Frechet distance = between the \"<class>\" samples' and the class's real test "
            "images' embeddings (lower better); subject loss = denoising loss of the subject's "
            "test images with \"[V] <class>\" (lower better); drift = denoising loss of the "
            "class's other images with \"<class>\", after - before (lower better)."), "",
           "| arm | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |",
           "|---|" + "---|" * len(METRICS)]
  lines.append("| backbone (before) | "
               + " | ".join(report_lib.mean_sd(s["backbone"][m]) for m in METRICS) + " |")
  for arm, m in s["arms"].items():
    lines.append(f"| {arm} | " + " | ".join(report_lib.mean_sd(m[k]) for k in METRICS) + " |")
  lines += ["", "Paired differences (arm - reference, mean [95% t-interval] over units):", "",
            "| arm | vs | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |",
            "|---|---|" + "---|" * len(METRICS)]
  for arm, refs in s["paired"].items():
    for ref, st in refs.items():
      cells = " | ".join(report_lib.interval(st[k]) for k in METRICS)
      lines.append(f"| {arm} | {ref} | {cells} |")
  return lines


def goal_verdict(results: dict[str, Any], arm: str = "albat") -> str:
  """Whether `arm` met the personalization goal, from the paired intervals: beat none and
  random on subject fidelity (interval above 0), and lose less class preservation than none
  (interval above 0); and how it compares with the other references the run has (oracle,
  prior preservation, less) on both."""
  paired = results["summary"]["paired"].get(arm)
  if not paired:
    return ""

  def word(ref: str, metric: str) -> str:
    st = paired.get(ref, {}).get(metric)
    if st is None:
      return ""
    side = report_lib.outcome(st)
    if side is None:
      return f"{ref}: one unit ({st['mean']:+.4f})"
    how = {"above": "better", "below": "worse", "tie": "a tie"}[side]
    return f"{ref}: {how} ({report_lib.interval(st)})"

  parts = []
  refs = tuple(r for r in PAIRED_REFS if r != "backbone")
  for metric in ("subject_fid", "class_pres"):
    cells = [w for w in (word(r, metric) for r in refs) if w]
    if cells:
      parts.append(f"{METRIC_NAMES[metric]} vs " + "; ".join(cells))
  return f"`{arm}` (higher is better on both): " + ". ".join(parts) + "." if parts else ""


def pool_arm_lines(results: dict[str, Any]) -> list[str]:
  """How many distinct pool images each pool arm trained on (first seed, per subject) and
  their class precision; the oracle's candidates per subject (report.md, docs/results.md)."""
  lines: list[str] = []
  pool_arms = [a for a in results["arms"]  # The arms that drew images from the pool.
               if any(r.get("aug_ids") is not None for r in results["runs"][a].values())]
  if pool_arms:
    lines += ["", "Pool images each arm trained on (distinct, first seed) and their class "
              "precision (share of the subject's class; mean over units):", ""]
    first = results["seeds"][0]
    for a in pool_arms:
      runs = results["runs"][a]
      counts = [f"{sub['name']} {len(runs[sub['name'] + '/' + str(first)]['aug_ids'])}"
                for sub in results["task"]["subjects"]]
      precision = np.mean([runs[u]["aug_precision"] for u in results["units"]])
      lines.append(f"- {a}: " + ", ".join(counts) + f"; precision {fmt(float(precision))}")
    if "oracle" in results["arms"]:
      lines.append("- oracle ranks the pool's images of the subject's class by distance to "
                   "the subject's k-means centre and takes the nearest; the class's images in "
                   "the pool: "
                   + ", ".join(f"{sub['name']} {sub.get('n_oracle')}"
                               for sub in results["task"]["subjects"]))
  return lines


def render_report(results: dict[str, Any]) -> str:
  """report.md from results.json's numbers (so the two always agree)."""
  s = results["summary"]
  b = results["backbone"]
  n_units = len(results["units"])
  lines = [f"# Personalization: {results['task']['description']}", "",
           (f"Seeds {results['seeds']}; {n_units} (subject, seed) units, paired across arms; "
            f"every arm ran {results['train_steps']} steps. Backbone: {b['note']}. "
            f"Classifier test accuracy {fmt(results['classifier']['test_accuracy'])}."), "",
           "## Backbone: class-prompted samples classified as their class", "",
           "| " + " | ".join(b["class_accuracy"]) + " | mean |",
           "|" + "---|" * (len(b["class_accuracy"]) + 1),
           "| " + " | ".join(f"{v:.2f}" for v in b["class_accuracy"].values())
           + f" | {b['mean_class_accuracy']:.3f} |", "",
           "![backbone](grids/backbone.png)", "",
           "## Metrics per arm (mean ± sd over units)", "", *metric_tables(results)]
  al = results.get("albat")
  if al:
    lines += ["", f"ALBAT: score `{al['score']}` ({al['cond']} prompt), rule `{al['rule']}` "
              f"(tau {al['tau']}, top_n {al['top_n']}), k = {al['k']} of a pool of "
              f"{al['pool_size']}. Class precision of the picks per seed (pool base rate):"]
    for name, info in al["subjects"].items():
      lines.append(f"- {name}: " + ", ".join(fmt(p) for p in info["precision"])
                   + f" ({fmt(info['base_rate'])}); picks of the first seed by class: "
                   + ", ".join(f"{c} {n}" for c, n in info["picks_per_class"].items()))
  lines += pool_arm_lines(results)
  lines += ["", "## Samples", "",
            ("Per subject: top row the subject's real images (adaptation set, then test "
             "images); below, one row of \"[V] <class>\" samples per arm ("
             + ", ".join(results["arms"]) + f"), seed {results['seeds'][0]}."), ""]
  for sub in results["task"]["subjects"]:
    lines += [f"{sub['name']}:", "", f"![{sub['name']}](grids/{sub['name']}.png)", ""]
  t = results["timings_s"]
  lines += ["## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in t.items()), ""]
  if results.get("reused_units"):
    lines += [f"This invocation's only: it reused {results['reused_units']} (subject, arm, "
              "seed) units finished earlier.", ""]
  return "\n".join(lines)
