"""docs/results.md, generated from the results.json files of the runs it lists (never typed in).

  python -m jbat.results_doc runs/demo runs/demo_goodhealth ... [-o docs/results.md]
  python -m jbat.results_doc --readme README.md   # refresh the README's marked tables

Each RUN is a workdir (or its results.json). Per run: the command's config, the pairs (split,
draw and training seeds), the split sizes and near-duplicates dropped, the machine it ran on,
and one table: test NLL at the best validation step per arm, paired differences vs none /
random / oracle with 95% t-intervals over all pairs, gap closed, distinct backbone documents
seen, validation NLL; then one sentence per selecting arm saying whether it beats none, random
and the oracle (an interval entirely below zero). Numbers are exactly those of results.json.
`--readme FILE` rewrites the compact tables between `<!-- results_doc: RUN -->` and
`<!-- /results_doc -->` in FILE from RUN's results.json (`brief_table`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from jbat import io, registry, report
from jbat.errors import JbatError

REPRODUCIBILITY = (
    "Reproducibility: rerunning a config on the same machine gives bitwise the same numbers "
    "(every seed is fixed and every stage is deterministic); that claim holds **on one "
    "machine**. XLA on another CPU, a GPU or a TPU, or another device count, changes the last "
    "bits of losses and scores, which can move a selection near its cut-off and the numbers "
    "after it (in the third or fourth decimal).")


def machine() -> dict[str, Any]:
  """What results.json records about the machine a run ran on (no host name)."""
  import jax
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  devices = jax.devices()
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "system": platform.system(),
          "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": len(devices),
          "device_kind": devices[0].device_kind if devices else ""}


def wall_text(res: dict[str, Any]) -> str:
  """"Wall time N min." of a run; a resumed run's time is that of its last invocation only."""
  text = f"Wall time {res.get('seconds', 0) / 60:.1f} min"
  if res.get("resumed"):
    text += f" (its last invocation only: {report.RESUMED_CLAUSE})"
  return text + "."


def machine_text(m: dict[str, Any] | None) -> str:
  if not m:
    return "not recorded in results.json"
  return (f"{m['cpu']} ({m['cpu_count']} cores), {m['system']}, python {m['python']}, "
          f"jax {m['jax']} on {m['devices']} {m['backend']} device(s) ({m['device_kind']})")


def load(path: str | os.PathLike) -> tuple[pathlib.Path, dict[str, Any]]:
  """(results.json path, its content) for a workdir or a results.json path."""
  p = pathlib.Path(path)
  if p.is_dir():
    p = p / "results.json"
  try:
    return p, json.loads(p.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise JbatError(f"results_doc: cannot read {p}: {e}") from None


def verdict(name: str, stats: dict[str, Any], key: str, arms: Sequence[str]) -> str:
  """'`albat` beats none (yes), random (yes), oracle (no: -0.001 [..])' on `key`."""
  parts = []
  for ref in ("none", "random", "oracle"):
    s = stats.get(f"{key}_vs_{ref}")
    if ref not in arms or ref == name or not s:
      continue
    side = report.outcome(s)
    if side is None:
      parts.append(f"{ref}: one pair, no interval ({s['mean']:+.4f})")
    else:
      word = {"below": "yes", "above": "no, worse", "tie": "no, a tie"}[side]
      parts.append(f"{ref}: {word} ({report.interval(s)})")
  return f"- `{name}` beats " + "; ".join(parts) + "." if parts else ""


def dropped_text(res: dict[str, Any]) -> str:
  """Near-duplicates dropped, per split ("not counted": a streamed pool no arm read whole)."""
  per = res.get("near_dup_dropped_per_split", [res["near_dup"]["dropped"]])
  return ", ".join("not counted" if x is None else str(x) for x in per)


def run_section(path: pathlib.Path, res: dict[str, Any], shown: str) -> str:
  """One run's section: header facts, the table, the verdicts."""
  arms = res["arms"]
  key = report.headline(arms)
  metric = ("test NLL at the best validation step" if key == "test_nll_best" else
            "validation NLL (this run has no test split)")
  pairs = res.get("pairs") or [[None, None, s] for s in res["seeds"]]
  nd = res.get("near_dup")
  target = ("your task files (`data.adapt`)" if res["domain"] == "data.adapt" else
            f"target `{res['domain']}`")
  lines = [f"## {res['config']}: {target}", "",
           f"From `{shown}`. Pairs: {len(pairs)} (split seeds "
           f"{', '.join(map(str, res.get('split_seeds', []))) or '-'}; draw seeds "
           f"{', '.join(map(str, res.get('draw_seeds', []))) or '-'}; training seeds "
           f"{', '.join(map(str, res['seeds']))}). Target documents: {res['n_adapt']} "
           f"adaptation, {res.get('n_valid', '-')} validation, {res.get('n_test', '-')} test; "
           f"backbone pool {res['n_pool']:,}"
           + (f" ({dropped_text(res)} near-duplicates of the target's documents dropped)"
              if nd else "")
           + f". {wall_text(res)}", "",
           f"Machine: {machine_text(res.get('machine'))}.", "",
           f"Headline metric: {metric}, mean ± sd over pairs; differences paired over pairs "
           "with 95% t-intervals (negative = the arm is better).", "",
           "| arm | test NLL (best valid step) | vs none [95% CI] | vs random [95% CI] | "
           "vs oracle [95% CI] | gap closed | distinct docs | valid NLL (best) |",
           "|---|---|---|---|---|---|---|---|"]
  for name, a in arms.items():
    s = res["stats"].get(name, {})
    gap = s.get("gap_closed")
    test = report.mean_sd(a["test_nll_best"]) if "test_nll_best" in a else "-"
    distinct = f"{np.mean(a['distinct_docs']):.0f}" if "distinct_docs" in a else "-"
    lines.append(
        f"| {name} | {test} | {report.interval(s.get(f'{key}_vs_none'))} | "
        f"{report.interval(s.get(f'{key}_vs_random'))} | "
        f"{report.interval(s.get(f'{key}_vs_oracle'))} | "
        f"{'-' if gap is None else f'{100 * gap:.0f}%'} | {distinct} | "
        f"{report.mean_sd(a['best_nll'])} |")
  verdicts = [verdict(n, res["stats"].get(n, {}), key, list(arms)) for n in arms
              if n not in ("none", "random", "oracle")]
  verdicts = [v for v in verdicts if v]
  if verdicts:
    lines += ["", *verdicts]
  peers = peer_lines(arms, key)
  if peers:
    lines += ["", *peers]
  if any("test_rouge_l_best" in a for a in arms.values()):  # Generated answers (eval.generate).
    lines += ["", "Greedy test answers at the best validation step (ROUGE-L F and exact match "
              "against the reference; differences paired by seed):", "",
              report.task_table(res, "best"), "",
              "The first seed's first answers per arm, beside the reference:", "",
              report.answer_samples(res, "best").rstrip()]
  return "\n".join(lines) + "\n"


def peer_lines(arms: dict[str, dict[str, Any]], key: str) -> list[str]:
  """ALBAT against each baseline of registry.PEER_ARMS the run has, on the headline metric,
  paired over the run's pairs (from the arms' per-pair values in results.json)."""
  if "albat" not in arms or key not in arms["albat"]:
    return []
  out = []
  for peer in (p for p in registry.PEER_ARMS if p in arms and key in arms[p]):
    st = report.paired_interval([x - y for x, y in zip(arms["albat"][key], arms[peer][key])])
    how = {None: "one pair", "tie": "a tie", "below": "ALBAT better",
           "above": f"{peer} better"}[report.outcome(st)]
    metric = "test NLL" if key == "test_nll_best" else "validation NLL"
    out.append(f"- albat - {peer} ({metric}, paired): {report.interval(st)}: {how}.")
  return out


def personalization_resumed(res: dict[str, Any]) -> bool:
  """Whether a personalization run's results.json came from an invocation that reused units
  finished earlier (its "resumed"; for files written before that key: an arm of the run with
  no time in this invocation's timings)."""
  if "resumed" in res:
    return bool(res["resumed"])
  return any(res["timings_s"].get(f"arm_{a}", 0.0) < 1.0 for a in res["arms"])


def personalization_section(res: dict[str, Any], shown: str) -> str:
  """A personalization run's section (jbat.diffusion: its results.json has `units`): the
  task, the backbone's class accuracy, the metric tables and whether albat met its goal."""
  from jbat.diffusion import report as diffusion_report  # Only for such runs.
  b, t = res["backbone"], res["timings_s"]
  lines = [f"## Personalization: {res['task']['description']}", "",
           f"From `{shown}`. Seeds {', '.join(map(str, res['seeds']))}; {len(res['units'])} "
           f"(subject, seed) units, paired across arms; every arm ran {res['train_steps']} "
           f"steps. Backbone: {b['note']}; its class-prompted samples are classified as their "
           f"class {100 * b['mean_class_accuracy']:.1f}% of the time (mean over the 10 "
           f"classes; classifier test accuracy {100 * res['classifier']['test_accuracy']:.1f}%)."
           " " + wall_text({"seconds": t["total"], "resumed": personalization_resumed(res)}),
           "",
           f"Machine: {machine_text(res.get('machine'))}.", "",
           "The backbone's class-prompted samples classified as their class, per class:", "",
           "| " + " | ".join(b["class_accuracy"]) + " | mean |",
           "|" + "---|" * (len(b["class_accuracy"]) + 1),
           "| " + " | ".join(f"{v:.2f}" for v in b["class_accuracy"].values())
           + f" | {b['mean_class_accuracy']:.3f} |", "",
           *diffusion_report.metric_tables(res), *diffusion_report.pool_arm_lines(res)]
  goal = diffusion_report.goal_verdict(res)
  if goal:
    lines += ["", "Goal: beat none and random on subject fidelity, lose less class preservation "
              "than none. " + goal]
  return "\n".join(lines) + "\n"


BLOCK = re.compile(r"(<!-- results_doc: (?P<run>\S+) -->\n)(?P<body>.*?)(<!-- /results_doc -->)",
                   re.DOTALL)


def brief_table(res: dict[str, Any]) -> str:
  """A compact table of one run for the README: test NLL at the best validation step and its
  paired difference vs none and random per arm; ROUGE-L and its difference vs none when the
  run generated answers."""
  arms, st, ts = res["arms"], res["stats"], res.get("task_stats", {})
  gen = all("test_rouge_l_best" in a for a in arms.values())
  head = ["arm", "test NLL", "vs none [95% CI]", "vs random [95% CI]"]
  head += ["ROUGE-L", "vs none [95% CI]"] if gen else []
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, a in arms.items():
    cells = [name, f"{np.mean(a['test_nll_best']):.4f}",
             report.interval(st.get(name, {}).get("test_nll_best_vs_none")),
             report.interval(st.get(name, {}).get("test_nll_best_vs_random"))]
    if gen:
      cells += [f"{np.mean(a['test_rouge_l_best']):.4f}",
                report.interval(ts.get(name, {}).get("test_rouge_l_best_vs_none"))]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows) + "\n"


def update_blocks(text: str, root: pathlib.Path) -> tuple[str, int]:
  """`text` with every block between `<!-- results_doc: RUN -->` and `<!-- /results_doc -->`
  replaced by `brief_table` of RUN (relative to `root`); and the number of blocks."""
  found = list(BLOCK.finditer(text))
  tables = {m["run"]: brief_table(load(root / m["run"])[1]) for m in found}
  return BLOCK.sub(lambda m: m.group(1) + tables[m["run"]] + m.group(4), text), len(found)


def render(paths: Sequence[str | os.PathLike], root: pathlib.Path | None = None) -> str:
  """docs/results.md's text for the runs at `paths` (shown relative to `root`)."""
  if not paths:
    raise JbatError("results_doc: name at least one run directory or results.json")
  loaded = [load(p) for p in paths]
  shown = []
  for p, _ in loaded:
    try:
      shown.append(str(p.resolve().relative_to(root.resolve())) if root else str(p))
    except ValueError:
      shown.append(str(p))
  head = ["# Results", "",
          "Generated by `python -m jbat.results_doc " + " ".join(shown) + "` from those "
          "results.json files; do not edit by hand (rerun the command).", "",
          "Protocol: the best step of every adapter is chosen on the validation split; the test "
          "split is read once per arm and pair after training, at that step. Arms are paired "
          "by (split seed, draw seed, training seed). Gap closed = (random - arm) / (random - "
          "oracle). Distinct docs: backbone documents an adapter saw over all its "
          "(re-)selections (the oracle re-draws at albat's re-selection steps).", "",
          REPRODUCIBILITY, ""]
  sections = [(personalization_section(res, s) if "units" in res else run_section(p, res, s))
              for (p, res), s in zip(loaded, shown)]
  return "\n".join(head) + "\n" + "\n".join(x + "\n" for x in sections).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jbat.results_doc", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="*", help="workdirs or results.json files")
  parser.add_argument("-o", "--output", default="docs/results.md")
  parser.add_argument("--readme", default=None, help="instead: refresh the tables between "
                      "`<!-- results_doc: RUN -->` and `<!-- /results_doc -->` in this file")
  args = parser.parse_args(argv)
  try:
    if args.readme:
      path = pathlib.Path(args.readme)
      try:
        original = path.read_text()
      except OSError as e:
        raise JbatError(f"results_doc: cannot read --readme {path}: {e.strerror}") from None
      text, n = update_blocks(original, pathlib.Path.cwd())
      io.write_text_atomic(path, text)
      print(f"refreshed {n} table(s) in {path}")
      return 0
    out = pathlib.Path(args.output)
    text = render(args.runs, root=pathlib.Path.cwd())
    io.write_text_atomic(out, text)
  except JbatError as e:
    print(f"jbat: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
