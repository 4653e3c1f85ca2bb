"""Evaluation report: `report.md` (a results table) and `loss_curves.png` in the run directory."""

from __future__ import annotations

import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jbat import io  # noqa: E402


def plot_curves(workdir: pathlib.Path, arms: list[str], path: pathlib.Path) -> None:
  """Held-out NLL and training loss against step, one line per arm."""
  fig, (ax_eval, ax_train) = plt.subplots(1, 2, figsize=(10, 4))
  for arm in arms:
    records = io.read_jsonl(workdir / "arms" / arm / "metrics.jsonl")
    ev = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if ev:
      ax_eval.plot(*zip(*ev), marker="o", label=arm)
    if tr:
      ax_train.plot(*zip(*tr), label=arm)
  ax_eval.set(xlabel="step", ylabel="held-out NLL (nats/token)", title="Held-out loss")
  ax_train.set(xlabel="step", ylabel="train loss (nats/token)", title="Training loss")
  for ax in (ax_eval, ax_train):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  with io.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)


def results_table(arms: list[dict[str, Any]]) -> str:
  rows = ["| arm | backbone NLL | best NLL (step) | final NLL | best - backbone | adapter params |",
          "|---|---|---|---|---|---|"]
  for r in arms:
    rows.append(f"| {r['arm']} | {r['backbone_loss']:.4f} | {r['best_loss']:.4f} "
                f"({r['best_step']}) | {r['final_loss']:.4f} | "
                f"{r['best_loss'] - r['backbone_loss']:+.4f} | {r['adapter_params']:,} |")
  return "\n".join(rows)


def write_report(workdir: pathlib.Path, summary: dict[str, Any]) -> None:
  workdir = pathlib.Path(workdir)
  arms = [r["arm"] for r in summary["arms"]]
  plot_curves(workdir, arms, workdir / "loss_curves.png")
  text = f"""# jbat report: {summary['config']}

Adaptation domain `{summary['domain']}`: {summary['n_adapt']} adaptation documents,
{summary['n_heldout']} held-out documents, backbone pool of {summary['n_pool']:,} documents.
Backbone: {summary['backbone_params']:,} parameters
({'loaded from cache' if summary['backbone_cached'] else 'pretrained in this run'}).
Held-out NLL is the mean token negative log-likelihood in nats/token; "backbone" is the model
before adaptation (step 0), "best" the best evaluated step.

{results_table(summary['arms'])}

![loss curves](loss_curves.png)

Wall time: {summary['seconds']:.0f} s.
"""
  io.write_text_atomic(workdir / "report.md", text)
