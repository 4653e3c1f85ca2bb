"""Selection quality: every arm on the three demo tasks; gap closed between random and the oracle.

  python benchmarks/selection_quality.py                  # the three demo tasks
  python benchmarks/selection_quality.py --arms none,random,oracle,albat,loss_diff,align,dsir
  python benchmarks/selection_quality.py --tiny           # toy size, a smoke run
  python benchmarks/selection_quality.py --tasks tweets --arms none,random,oracle,albat \
      --set bat.reselect_every=60 --set bat.reselect_top=3000 --tag reselect   # any config key

For each task it runs `jbat.experiment.run` (resumable: finished arms are read back from the
workdir, `runs/bench_<task>` by default) and prints a table of best *validation* NLL per arm
(mean over pairs) with the paired difference to random and
`gap_closed = (L_random - L_arm) / (L_random - L_oracle)`, all on validation: this is what
defaults (score, rule, top_n, re-selection, k, rho) are chosen on; the test numbers are in each
run's report.md / results.json, never used to choose. The last line is one JSON object:
`{"tasks": {task: {"gap_closed": {arm: g}, "best_nll": {arm: mean}, "beats_random": {arm:
bool}}}}`, where beats_random means the 95% interval of the paired difference is below zero.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jbat import config as config_lib  # noqa: E402
from jbat import experiment  # noqa: E402

TASKS = {"tweets": "configs/demo.py", "goodhealth": "configs/demo_goodhealth.py",
         "fortunes": "configs/demo_fortunes.py"}


def set_key(parser: argparse.ArgumentParser, cfg, item: str) -> None:
  """Applies one --set KEY=VALUE, the value parsed as the type of the key's current value."""
  key, sep, text = item.partition("=")
  *path, leaf = key.split(".")
  node = cfg
  try:
    for part in path:
      node = node[part]
    current = node[leaf]
  except (KeyError, AttributeError):
    parser.error(f"--set {item}: no config key {key!r}")
  if not sep:
    parser.error(f"--set {item}: expected KEY=VALUE")
  kind = type(current)
  try:
    node[leaf] = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
  except ValueError:
    parser.error(f"--set {item}: {key} expects a {kind.__name__}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tasks", default="tweets,goodhealth,fortunes",
                 help=f"comma-separated, of {','.join(TASKS)}")
  p.add_argument("--arms", default="none,random,oracle,albat,dsir,loss_diff,align",
                 help="comma-separated arms ('' = the config's)")
  p.add_argument("--seeds", default="", help="comma-separated seeds (default: the config's)")
  p.add_argument("--tiny", action="store_true", help="toy-size configs (smoke run)")
  p.add_argument("--workdir", default="runs")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config key (repeatable), e.g. select.score=align")
  p.add_argument("--tag", default="", help="suffix of the workdirs (runs/bench_<task>_<tag>)")
  args = p.parse_args()

  out = {}
  tasks = args.tasks.split(",")
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    p.error(f"--tasks: unknown {unknown}; expected some of {sorted(TASKS)}")
  for task in tasks:
    cfg = config_lib.load_config_file(ROOT / TASKS[task], "tiny" if args.tiny else None)
    if args.arms:
      cfg.arms = args.arms
    if args.seeds:
      cfg.seeds = args.seeds
    if "random" not in cfg.arms.split(","):
      cfg.arms = "random," + cfg.arms
    for item in args.set:
      set_key(p, cfg, item)
    cfg.name = f"bench_{task}{'_tiny' if args.tiny else ''}{'_' + args.tag if args.tag else ''}"
    cfg.workdir = str(pathlib.Path(args.workdir) / cfg.name)
    cfg.progress = False
    config_lib.validate(cfg)
    summary = experiment.run(cfg)
    arms, st = summary["arms"], summary["stats"]
    print(f"\n== {task}: domain {summary['domain']}, seeds {summary['seeds']} ==")
    print(f"{'arm':<16}{'valid NLL':>10}{'vs random [95% CI]':>32}{'gap closed':>12}"
          f"{'precision':>11}")
    res = {"gap_closed": {}, "best_nll": {}, "beats_random": {}}
    for name, a in arms.items():
      mean = sum(a["best_nll"]) / len(a["best_nll"])
      vs = st.get(name, {}).get("best_nll_vs_random")
      ci = "-" if not vs else (f"{vs['mean']:+.4f}" + (
          f" [{vs['lo']:+.4f}, {vs['hi']:+.4f}]" if vs["lo"] is not None else ""))
      gap = st.get(name, {}).get("gap_closed_valid", st.get(name, {}).get("gap_closed"))
      prec = a.get("precision")
      print(f"{name:<16}{mean:>10.4f}{ci:>32}{'-' if gap is None else f'{100 * gap:.0f}%':>12}"
            f"{'-' if prec is None else f'{prec:.2f}':>11}")
      res["best_nll"][name] = mean
      if gap is not None:
        res["gap_closed"][name] = gap
      if vs:
        res["beats_random"][name] = vs["hi"] is not None and vs["hi"] < 0
    out[task] = res
  print(json.dumps({"tasks": out}, sort_keys=True))


if __name__ == "__main__":
  main()
