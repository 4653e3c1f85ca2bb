"""Evaluation report: paired statistics over seeds, `report.md`, and PNG plots.

`paired_stats` compares every arm with `none`, `random` and `oracle` pair by pair (the arms
share the pairs (split seed, draw seed, training seed), so differences are paired): mean
difference of validation NLL and of test NLL (at the best validation step) with its 95%
t-interval over all pairs. Negative means the arm is better. `write_report` renders
`report.md` from the same `results.json` numbers, with `loss_curves.png` (mean validation NLL
per step) and `selected_labels.png`.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import matplotlib
import numpy as np
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jbat import io, layout  # noqa: E402


def paired_interval(diffs: list[float]) -> dict[str, Any]:
  """Mean of paired differences with a 95% t-interval (None with a single pair)."""
  d = np.asarray(diffs, dtype=np.float64)
  mean = float(d.mean())
  if len(d) < 2:
    return {"mean": mean, "lo": None, "hi": None, "n": len(d)}
  half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(d)}


def outcome(s: dict[str, Any]) -> str | None:
  """Where a `paired_interval` of differences lies against 0: "below" (entirely under 0),
  "above" (entirely over 0), "tie" (0 inside), None for a single pair (no interval). The one
  rule every verdict of the reports reads its word from."""
  if s.get("lo") is None or s.get("hi") is None:
    return None
  return "below" if s["hi"] < 0 else "above" if s["lo"] > 0 else "tie"


METRICS = ("best_nll", "final_nll", "test_nll_best", "test_nll_final")
# Why a resumed run's wall time is not the whole run's (report.md and docs/results.md).
RESUMED_CLAUSE = "it continued a run started earlier"


def headline(arms: dict[str, dict[str, Any]]) -> str:
  """The metric the report leads with: test NLL at the best validation step when the arms
  have it, else the validation NLL."""
  has_test = arms and all("test_nll_best" in a for a in arms.values())
  return "test_nll_best" if has_test else "best_nll"


def paired_stats(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Per arm: paired differences of each metric (METRICS, where present) vs `none`, `random`
  and `oracle`; gap closed = (random - arm) / (random - oracle) on the headline metric, and
  `gap_closed_valid` on the validation NLL (to choose defaults on) when the headline is test."""
  out: dict[str, Any] = {}
  key = headline(arms)
  for name, a in arms.items():
    s: dict[str, Any] = {}
    for ref in ("none", "random", "oracle"):
      if ref in arms and ref != name:
        for metric in METRICS:
          if metric in a and metric in arms[ref]:
            if len(a[metric]) != len(arms[ref][metric]):
              raise ValueError(f"arms {name} and {ref} have different numbers of pairs")
            diffs = [x - y for x, y in zip(a[metric], arms[ref][metric])]
            s[f"{metric}_vs_{ref}"] = paired_interval(diffs)
    if "random" in arms and "oracle" in arms and name not in ("none", "random", "oracle"):
      l_rand = float(np.mean(arms["random"][key]))
      l_orc = float(np.mean(arms["oracle"][key]))
      gap = l_rand - l_orc
      s["gap_closed"] = (l_rand - float(np.mean(a[key]))) / gap if gap > 0 else None
      if key != "best_nll":  # The validation one too: what defaults are chosen on.
        l_rand = float(np.mean(arms["random"]["best_nll"]))
        gap = l_rand - float(np.mean(arms["oracle"]["best_nll"]))
        s["gap_closed_valid"] = ((l_rand - float(np.mean(a["best_nll"]))) / gap if gap > 0
                                 else None)
    out[name] = s
  return out


TASK_METRICS = ("test_nll_best", "test_nll_final", "test_rouge_l_best", "test_rouge_l_final",
                "test_exact_match_best", "test_exact_match_final")


def task_stats(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Per arm: paired differences (`paired_interval`, arm - reference, by seed) of each test
  metric in TASK_METRICS it has vs `none` and `random` ("<metric>_vs_<ref>"). For NLL lower is
  better, for ROUGE-L / exact match higher."""
  out: dict[str, Any] = {}
  for name, a in arms.items():
    s: dict[str, Any] = {}
    for ref in ("none", "random"):
      if ref in arms and ref != name:
        for metric in TASK_METRICS:
          if metric in a and metric in arms[ref]:
            s[f"{metric}_vs_{ref}"] = paired_interval(
                [x - y for x, y in zip(a[metric], arms[ref][metric])])
    out[name] = s
  return out


def task_table(summary: dict[str, Any], at: str = "best") -> str:
  """report.md's table of the test metrics at one adapter state ("best" or "final"): mean ± sd
  over seeds and paired differences vs none / random with 95% intervals. Empty when no arm has
  test metrics."""
  arms = {n: a for n, a in summary["arms"].items() if f"test_nll_{at}" in a}
  if not arms:
    return ""
  gen = any(f"test_rouge_l_{at}" in a for a in arms.values())
  head = ["arm", "test NLL", "- none [95% CI]", "- random [95% CI]"]
  if gen:
    head += ["ROUGE-L", "- none [95% CI]", "- random [95% CI]", "exact match"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  stats_ = summary.get("task_stats", {})
  for name, a in arms.items():
    s = stats_.get(name, {})
    cells = [name, mean_sd(a[f"test_nll_{at}"]), interval(s.get(f"test_nll_{at}_vs_none")),
             interval(s.get(f"test_nll_{at}_vs_random"))]
    if gen:
      r = f"test_rouge_l_{at}"
      cells += ([mean_sd(a[r]), interval(s.get(f"{r}_vs_none")),
                 interval(s.get(f"{r}_vs_random")), mean_sd(a[f"test_exact_match_{at}"])]
                if r in a else ["-"] * 4)
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def _cell(text: str, limit: int = 300) -> str:
  text = " ".join(text.split()).replace("|", "\\|")
  return text if len(text) <= limit else text[:limit - 1] + "…"


def answer_samples(summary: dict[str, Any], at: str = "best") -> str:
  """report.md's generated answers (the first seed's first eval.n_examples test prompts) per
  arm beside the reference; empty when none were generated."""
  arms = {n: a[f"answers_{at}"] for n, a in summary["arms"].items() if a.get(f"answers_{at}")}
  if not arms:
    return ""
  lines = []
  for name, rows in arms.items():
    lines += [f"**{name}**", "", "| reference | answer | ROUGE-L |", "|---|---|---|"]
    lines += [f"| {_cell(r['reference'])} | {_cell(r['answer'])} | {r['rouge_l']:.3f} |"
              for r in rows]
    lines.append("")
  return "\n".join(lines)


def mean_sd(x: list[float]) -> str:
  """'mean ± sd' (sample sd) with 4 decimals; a single value alone."""
  return f"{np.mean(x):.4f} ± {np.std(x, ddof=1):.4f}" if len(x) > 1 else f"{x[0]:.4f}"


def interval(s: dict[str, Any] | None) -> str:
  """A `paired_interval` as '+mean [lo, hi]' ('-' for none, no bracket for one seed)."""
  if not s:
    return "-"
  if s["lo"] is None:
    return f"{s['mean']:+.4f}"
  return f"{s['mean']:+.4f} [{s['lo']:+.4f}, {s['hi']:+.4f}]"


def results_table(summary: dict[str, Any]) -> str:
  """The arms: validation NLL (best, final), test NLL at the best validation step, paired
  differences of the headline metric vs none / random / oracle, gap closed, distinct backbone
  documents seen (mean over pairs), precision, labels, times."""
  key = headline(summary["arms"])
  rows = ["| arm | valid best | valid final | test at best valid step | vs none [95% CI] | "
          "vs random [95% CI] | vs oracle [95% CI] | gap closed | distinct docs | precision | "
          "top labels | select s | train s/seed |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, a in summary["arms"].items():
    s = summary["stats"].get(name, {})
    prec = "-" if a.get("precision") is None else f"{a['precision']:.2f}"
    top = ", ".join(f"{k} {v}" for k, v in list(a.get("label_counts", {}).items())[:3]) or "-"
    gap = s.get("gap_closed")
    test = mean_sd(a["test_nll_best"]) if "test_nll_best" in a else "-"
    distinct = f"{np.mean(a['distinct_docs']):.0f}" if "distinct_docs" in a else "-"
    rows.append(
        f"| {name} | {mean_sd(a['best_nll'])} | {mean_sd(a['final_nll'])} | {test} | "
        f"{interval(s.get(f'{key}_vs_none'))} | {interval(s.get(f'{key}_vs_random'))} | "
        f"{interval(s.get(f'{key}_vs_oracle'))} | "
        f"{'-' if gap is None else f'{100 * gap:.0f}%'} | {distinct} | {prec} | {top} | "
        f"{a.get('select_seconds', 0.0):.0f} | {np.mean(a['train_seconds']):.0f} |")
  return "\n".join(rows)


def pairs_text(summary: dict[str, Any]) -> str:
  """'Pairs: ...' sentence: the training, split and draw seeds the arms are paired by."""
  seeds = ", ".join(map(str, summary["seeds"]))
  splits = summary.get("split_seeds", [])
  draws = summary.get("draw_seeds", [])
  n = len(summary.get("pairs", [])) or len(summary["seeds"])
  return (f"Training seeds {seeds}; split seeds {', '.join(map(str, splits)) or '-'}; draw "
          f"seeds {', '.join(map(str, draws)) or '-'}: {n} pairs (arms paired by split, draw "
          "and training seed)")


def near_dup_text(summary: dict[str, Any]) -> str:
  """'; N pool documents dropped as near-duplicates ...' (per split with several), or the
  filter is off; '' for results without near-duplicate facts."""
  nd = summary.get("near_dup")
  if not nd:
    return ""
  if not nd["threshold"]:
    return "; near-duplicate filter off (data.near_dup = 0)"
  per = summary.get("near_dup_dropped_per_split") or [nd["dropped"]]
  how = (f"character {nd['n']}-gram Jaccard >= {nd['threshold']}, after normalisation"
         + ("; dropped from the streamed pool as it was read" if nd.get("streamed") else ""))
  if any(x is None for x in per):  # A streamed pool no arm read whole: nothing counted it.
    return (f"; pool records that are near-duplicates of them dropped ({how}; not counted: "
            "no arm read the whole pool)")
  n = f"{per[0]:,}" if len(per) == 1 else " / ".join(f"{x:,}" for x in per) + " (per split)"
  return f"; {n} pool documents dropped as near-duplicates of them ({how})"


def reselection_lines(summary: dict[str, Any]) -> str:
  """A paragraph on the re-selections (bat.reselect_every) of the arms that made them: per
  re-selection step, the mean over seeds of its overlap with the previous selection and of its
  precision. Empty when no arm re-selected."""
  lines = []
  for name, a in summary["arms"].items():
    per_seed = a.get("reselections")
    if not per_seed:
      continue
    parts = []
    for i, first in enumerate(per_seed[0]):
      overlap = np.mean([seed[i]["overlap"] for seed in per_seed])
      text = f"step {first['step']}: overlap {overlap:.2f}"
      if first.get("precision") is not None:
        text += f", precision {np.mean([seed[i]['precision'] for seed in per_seed]):.2f}"
      parts.append(text)
    around = ("its adapter" if summary["bat"].get("reselect_from", "adapter") == "adapter" else
              "the stage-1 surrogate (control)")
    lines.append(f"- `{name}` re-selected {len(parts)} time(s) around {around} ("
                 f"{'; '.join(parts)}; means over seeds; overlap = share of the new selection "
                 f"already in the previous one).")
  return ("\nRe-selection (bat.reselect_every = "
          f"{summary['bat'].get('reselect_every')}):\n" + "\n".join(lines) + "\n") if lines else ""


def diverged_lines(summary: dict[str, Any]) -> str:
  """A paragraph naming the arms stopped by a divergence (results.json "diverged"); empty when
  none diverged."""
  lines = [f"- `{name}` **diverged**: {d['message']}."
           for name, d in summary.get("diverged", {}).items()]
  return ("\nDiverged (no result, no adapter; the run exits with code 2):\n" + "\n".join(lines)
          + "\n") if lines else ""


def plot_curves(summary: dict[str, Any], path: pathlib.Path) -> None:
  """Held-out NLL against step, mean over seeds, one line per arm."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, a in summary["arms"].items():
    steps = [s for s, _ in a["curves"][0]]
    losses = np.mean([[v for _, v in c] for c in a["curves"]], axis=0)
    ax.plot(steps, losses, marker="o", ms=3, label=name)
  ax.set(xlabel="step", ylabel="validation NLL (nats/token)",
         title=f"Validation loss, mean over "
               f"{len(summary.get('pairs') or summary['seeds'])} pair(s)")
  ax.grid(alpha=0.3)
  if summary["arms"]:
    ax.legend()
  fig.tight_layout()
  with io.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)


def plot_labels(summary: dict[str, Any], path: pathlib.Path, top: int = 8) -> bool:
  """Grouped bars: how many selected documents each arm took from the most common labels."""
  arms = {n: a["label_counts"] for n, a in summary["arms"].items() if a.get("label_counts")}
  if not arms:
    return False
  totals: dict[str, int] = {}
  for counts in arms.values():
    for k, v in counts.items():
      totals[k] = totals.get(k, 0) + v
  labels = sorted(totals, key=lambda k: -totals[k])[:top]
  fig, ax = plt.subplots(figsize=(max(7, len(labels) * 1.1), 4.5))
  width = 0.8 / len(arms)
  for i, (name, counts) in enumerate(arms.items()):
    ax.bar(np.arange(len(labels)) + i * width, [counts.get(k, 0) for k in labels], width,
           label=name)
  ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=30, ha="right")
  ax.set(ylabel="selected documents", title="Labels of the selected backbone documents")
  ax.legend()
  fig.tight_layout()
  with io.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)
  return True


def write_report(workdir: pathlib.Path, summary: dict[str, Any]) -> None:
  workdir = pathlib.Path(workdir)
  plot_curves(summary, workdir / "loss_curves.png")
  has_labels = plot_labels(summary, workdir / "selected_labels.png")
  hists = sorted(p.relative_to(workdir) for p in workdir.glob("select/*/selection/score_hist.png"))
  sel = summary["select"]
  first = next(iter(summary["arms"].values()), None)
  text = f"""# jbat report: {summary['config']}

Adaptation domain `{summary['domain']}`: {summary['n_adapt']} adaptation documents,
{summary.get('n_valid', summary['n_heldout'])} validation and {summary.get('n_test', 0)} test
documents{near_dup_text(summary)}; backbone pool of {summary['n_pool']:,} documents
({summary['n_pretrain_pool']:,} of them used to pretrain the backbone).
Backbone: {summary['backbone_params']:,} parameters
({'loaded' if summary['backbone_cached'] else 'pretrained in this run'}); LoRA adapter:
{summary['adapter_params']:,} parameters. {pairs_text(summary)}.
Backbone arms: {sel['k']} selected documents, rho={summary['bat']['rho']}
of each batch, loss weight lam={summary['bat']['lam']}; ALBAT default score `{sel['score']}`,
rule `{sel['rule']}`{f" among the top {sel['top_n']}" if sel['top_n'] else ''}.

NLL in nats/token (lower is better), mean ± sd over pairs. "valid best" is the validation NLL
at the best validation step (the step is chosen on it), "valid final" at the last step; "test
at best valid step" is the test split's NLL at that step (read once, after training). The
differences ({'test' if headline(summary['arms']) == 'test_nll_best' else 'validation'} NLL at
the best validation step) are paired over (split, draw, training seed) with 95% t-intervals:
an interval entirely below zero means the arm beats the reference. Gap closed =
(random - arm) / (random - oracle) on the same means. Distinct docs: backbone documents an
adapter saw over all its (re-)selections. Validation NLL of the backbone (before adaptation):
{'-' if first is None else f"{first['backbone_nll']:.4f}"}.

{results_table(summary)}
{diverged_lines(summary)}{reselection_lines(summary)}
![held-out loss curves](loss_curves.png)
"""
  if has_labels:
    text += "\n![selected labels](selected_labels.png)\n"
  for h in hists:
    text += f"\n![score histogram {h.parts[1]}]({h})\n"
  text += f"\nWall time: {summary['seconds']:.0f} s" + (
      f" (this invocation only: {RESUMED_CLAUSE}).\n" if summary.get("resumed") else ".\n")
  io.write_text_atomic(workdir / layout.REPORT_FILE, text)
