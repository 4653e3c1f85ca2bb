"""Peak memory of a whole `jbat.train` run, stage by stage.

  python benchmarks/run_memory.py --config configs/smollm2_dict.py:cpu --config.seeds=0

Runs `python -m jbat.train` with the given arguments in this process, with a thread that reads
the process's resident set size (VmRSS) every 0.1 s, and wraps the pipeline's stages (model and
data loading, each arm's selection, surrogate training, pool scoring, adapter training, the
test evaluation, generation, the release of compiled programs) so that each prints its RSS
before and after and its peak while it ran. The run itself is unchanged (the same results).
At the end: the peak per stage kind, and one JSON line {"peak_rss_mb", "stages": {kind: peak}}.
The whole run's peak is the largest sample; ru_maxrss is printed beside it.

  python benchmarks/run_memory.py --without-torch --config configs/smollm2_dict.py:cpu

--without-torch measures the run as `requirements.lock` installs jbat (no torch: torch and peft
come only with the test lock, for the parity tests and the peers). With torch installed,
transformers imports it when the tokenizer loads (~185 MB of RSS); the flag makes the run see
torch as not installed (`sys.modules["torch"] = None`, which `importlib.util.find_spec`
reads as absent), so that the same environment measures both.
"""

from __future__ import annotations

import functools
import json
import pathlib
import resource
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# (module, function, stage kind) of the wrapped stages; nested stages (fit inside the
# surrogate) report separately and each counts toward its own kind.
STAGES = [
    ("jbat.experiment", "load_split", "load"),
    ("jbat.experiment", "select_arm_docs", "selection"),
    ("jbat.surrogate", "train_surrogate", "surrogate"),
    ("jbat.scoring.stream", "score_pool", "scoring"),
    ("jbat.training.loop", "fit", "training"),
    ("jbat.experiment", "test_nlls", "test evaluation"),
    ("jbat.experiment", "test_answers", "generation"),
    ("jbat.experiment", "release_compiled", "release"),
]


def rss_mb() -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) // 1024
  return 0


class Sampler:
  """The running peak of VmRSS, sampled every `every` seconds on a daemon thread: `peak` over
  the whole run, `window_peak` since a stage began (`wrap` saves and restores it around each
  stage, so nested stages each get their own)."""

  def __init__(self, every: float = 0.1):
    self.peak = self.window_peak = rss_mb()
    self.every = every
    threading.Thread(target=self._run, daemon=True).start()

  def _run(self) -> None:
    while True:
      now = rss_mb()
      self.peak, self.window_peak = max(self.peak, now), max(self.window_peak, now)
      time.sleep(self.every)


def wrap(sampler: Sampler, module, name: str, kind: str, peaks: dict[str, int], t0: float):
  inner = getattr(module, name)

  @functools.wraps(inner)
  def staged(*args, **kwargs):
    before = rss_mb()
    outer, sampler.window_peak = sampler.window_peak, before
    try:
      return inner(*args, **kwargs)
    finally:
      peak = max(sampler.window_peak, rss_mb())
      peaks[kind] = max(peaks.get(kind, 0), peak)
      print(f"[run_memory] {time.perf_counter() - t0:8.1f} s  {kind:16s} {name:18s} "
            f"RSS {before:6d} -> {rss_mb():6d} MB, peak {peak:6d} MB", flush=True)
      sampler.window_peak = max(outer, peak)

  setattr(module, name, staged)


def main(argv: list[str]) -> int:
  import importlib  # pylint: disable=import-outside-toplevel
  without_torch = "--without-torch" in argv
  argv = [a for a in argv if a != "--without-torch"]
  if without_torch:
    sys.modules["torch"] = None  # As if not installed (module docstring).
  sampler = Sampler()
  t0 = time.perf_counter()
  peaks: dict[str, int] = {}
  for mod_name, fn, kind in STAGES:
    wrap(sampler, importlib.import_module(mod_name), fn, kind, peaks, t0)
  from jbat import train  # pylint: disable=import-outside-toplevel
  rc = train.main(["jbat.train"] + argv)
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
  print("\nstage              peak RSS MB")
  for kind, peak in sorted(peaks.items(), key=lambda kv: -kv[1]):
    print(f"{kind:18s} {peak:11d}")
  print(f"whole run: {sampler.peak} MB sampled (ru_maxrss {maxrss} MB), "
        f"{time.perf_counter() - t0:.0f} s")
  print(json.dumps({"argv": argv, "without_torch": without_torch,
                    "torch_imported": bool(sys.modules.get("torch")),
                    "peak_rss_mb": sampler.peak, "ru_maxrss_mb": maxrss,
                    "stages": peaks, "seconds": round(time.perf_counter() - t0, 1)}))
  return rc or 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
