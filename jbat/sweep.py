"""Choosing a default on validation only: compare runs that differ in a few config keys.

  python -m jbat.sweep REFERENCE VARIANT [VARIANT ...] [--arm albat] [-o docs/defaults.md]

REFERENCE is a run with the current defaults; each VARIANT a run of the same config with some
keys changed (e.g. `--config.select.score=align`). Per run: the keys it changes against the
reference (from each workdir's config.json), and the arm's validation NLL at its best step
(`best_nll` in results.json), paired with the reference by (split seed, draw seed, training
seed) over the pairs both runs have, with a 95% t-interval of the paired difference.

The rule, fixed before any sweep was run: a variant replaces the default only when its paired
interval against the reference lies entirely below zero (better on validation beyond the
variance over splits, draws and seeds); among several such variants the one with the lowest
mean difference wins; otherwise the default stays. Test numbers are never read here: the
`test_*` entries of results.json are reported once, by `jbat.results_doc`, for the runs
whose configuration this rule chose.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jbat import config as config_lib
from jbat import io, report
from jbat.errors import JbatError

# Keys that differ between runs without changing what is compared: names and places, and the
# arms and seeds (the pairs are matched by seed).
IGNORED = ("name", "workdir", "cache_dir", "progress", "arms", "seeds", "split_seeds",
           "draw_seeds")


def load_run(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """(shown name, results.json, flattened config) of a workdir."""
  d = pathlib.Path(path)
  try:
    res = json.loads((d / "results.json").read_text())
    cfg = json.loads((d / "config.json").read_text())["config"]
  except (OSError, json.JSONDecodeError, KeyError) as e:
    raise JbatError(f"sweep: {d} is not a finished run (results.json and config.json): {e}"
                    ) from None
  return str(path), res, config_lib.flatten(ml_collections.ConfigDict(cfg))


def changed(ref: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
  """{key: value} where `cfg` differs from `ref`, outside IGNORED."""
  keys = sorted(set(ref) | set(cfg))
  return {k: cfg.get(k) for k in keys if k not in IGNORED and ref.get(k) != cfg.get(k)}


def valid_by_pair(res: dict[str, Any], arm: str, where: str) -> dict[tuple, float]:
  """{(split, draw, seed): validation NLL at the best step} of `arm` (never a test entry)."""
  if arm not in res.get("arms", {}):
    raise JbatError(f"sweep: {where} has no arm {arm!r} (it has {sorted(res.get('arms', {}))})")
  values = res["arms"][arm]["best_nll"]
  pairs = res.get("pairs") or [[None, None, s] for s in res["seeds"]]
  if len(pairs) != len(values):
    raise JbatError(f"sweep: {where}: {len(values)} values of arm {arm} for {len(pairs)} pairs")
  return {tuple(p): float(v) for p, v in zip(pairs, values)}


def compare(paths: Sequence[str | os.PathLike], arm: str = "albat") -> dict[str, Any]:
  """The sweep's rows and its choice (see the module docstring for the rule)."""
  if len(paths) < 2:
    raise JbatError("sweep: name a reference run and at least one variant")
  runs = [load_run(p) for p in paths]
  ref_name, ref_res, ref_cfg = runs[0]
  ref = valid_by_pair(ref_res, arm, ref_name)
  rows = [{"run": ref_name, "changes": {}, "n": len(ref),
           "valid_mean": float(np.mean(list(ref.values()))), "vs_reference": None}]
  for name, res, cfg in runs[1:]:
    got = valid_by_pair(res, arm, name)
    common = sorted(set(got) & set(ref), key=str)
    if not common:
      raise JbatError(f"sweep: {name} shares no (split, draw, seed) pair with {ref_name}")
    diffs = [got[p] - ref[p] for p in common]
    rows.append({"run": name, "changes": changed(ref_cfg, cfg), "n": len(common),
                 "valid_mean": float(np.mean([got[p] for p in common])),
                 "reference_mean": float(np.mean([ref[p] for p in common])),
                 "vs_reference": report.paired_interval(diffs)})
  better = [r for r in rows[1:] if report.outcome(r["vs_reference"]) == "below"]
  chosen = min(better, key=lambda r: r["vs_reference"]["mean"]) if better else rows[0]
  return {"arm": arm, "rows": rows, "chosen": chosen["run"],
          "rule": "a variant replaces the default only if its paired 95% interval against "
                  "the reference (validation NLL at the best step) is entirely below zero"}


def render(result: dict[str, Any]) -> str:
  lines = [f"Validation NLL (best step) of arm `{result['arm']}`, paired with the reference "
           "by (split, draw, training seed); negative = the variant is better. Test numbers "
           "are not read.", "",
           "| run | changes | pairs | valid NLL | vs reference [95% CI] | chosen |",
           "|---|---|---|---|---|---|"]
  for r in result["rows"]:
    changes = ", ".join(f"`{k}={v}`" for k, v in r["changes"].items()) or "(reference)"
    vs = report.interval(r["vs_reference"]) if r["vs_reference"] else "-"
    mark = "**yes**" if r["run"] == result["chosen"] else ""
    lines.append(f"| `{r['run']}` | {changes} | {r['n']} | {r['valid_mean']:.4f} | {vs} | "
                 f"{mark} |")
  lines += ["", f"Rule: {result['rule']}."]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jbat.sweep", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", help="the reference workdir, then the variants'")
  parser.add_argument("--arm", default="albat")
  parser.add_argument("-o", "--output", default=None, help="also write the table here (.md) "
                      "and the rows next to it (.json)")
  args = parser.parse_args(argv)
  try:
    result = compare(args.runs, args.arm)
    text = render(result)
    if args.output:
      text = ("# Defaults chosen on validation\n\nGenerated by `python -m jbat.sweep "
              + " ".join(args.runs) + (f" --arm {args.arm}" if args.arm != "albat" else "")
              + f" -o {args.output}` from those runs' results.json; do not edit by hand.\n\n"
              + text)
      out = pathlib.Path(args.output)
      io.write_text_atomic(out, text)
      io.write_json_atomic(out.with_suffix(".json"), result, finite=True)
  except JbatError as e:
    print(f"jbat: error: {e}", file=sys.stderr)
    return 2
  print(text, end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
