"""The run folder: where every stage writes, and whether a stage is done.

Every path of a workdir is spelled here and nowhere else:

  <workdir>/config.json, results.json, report.md
  <workdir>/select/<score>/                       one selection (`albat.select_backbone_data`):
      surrogate/        phi0.safetensors, phi_s.safetensors, fit/
      control/          the control surrogate (contrast scores only)
      scores/           chunk_*.npz + cursor.json, or source.json naming the score cache
      features/         projected gradients (rules cluster / round_robin)
      selection/        manifest.jsonl (written last), summary.json, score_hist.png
  <workdir>/arms/<arm>/seed_<s>/                  one adapter run (loop.fit's checkpoints)
      reselect/step_<t>/  a re-selection at step t (a selection folder as above)

A stage is done when its last file exists: a selection when its manifest does (written last,
after summary.json holds its request), a re-selection likewise.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

PathLike = str | pathlib.Path

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


# ----------------------------------------------------------------------------- workdir


def select_dir(workdir: PathLike, score: str) -> pathlib.Path:
  """The selection folder of a score (shared by the arm "albat" and the arm named `score`)."""
  return pathlib.Path(workdir) / "select" / score


def arm_dir(workdir: PathLike, arm: str, seed: int) -> pathlib.Path:
  """One adapter run: an arm trained with one seed."""
  return pathlib.Path(workdir) / "arms" / arm / f"seed_{seed}"


def reselect_dir(run_dir: PathLike, step: int) -> pathlib.Path:
  """The re-selection of an adapter run at `step` (a selection folder)."""
  return pathlib.Path(run_dir) / "reselect" / f"step_{step}"


# ----------------------------------------------------------------------------- selection folder


def surrogate_dir(folder: PathLike) -> pathlib.Path:
  return pathlib.Path(folder) / "surrogate"


def control_dir(folder: PathLike) -> pathlib.Path:
  return pathlib.Path(folder) / "control"


def scores_dir(folder: PathLike) -> pathlib.Path:
  """Where score_pool writes (chunks, or a source.json naming the shared score cache)."""
  return pathlib.Path(folder) / "scores"


def features_dir(folder: PathLike) -> pathlib.Path:
  return pathlib.Path(folder) / "features"


def selection_files(folder: PathLike) -> pathlib.Path:
  """The folder holding manifest.jsonl, summary.json and score_hist.png."""
  return pathlib.Path(folder) / "selection"


def manifest(folder: PathLike) -> pathlib.Path:
  return selection_files(folder) / "manifest.jsonl"


def summary(folder: PathLike) -> pathlib.Path:
  return selection_files(folder) / "summary.json"


def selection_done(folder: PathLike) -> bool:
  """Whether the selection of this folder finished (its manifest, written last, exists)."""
  return manifest(folder).exists()


def stored_request(folder: PathLike) -> dict[str, Any] | None:
  """The "request" recorded in the folder's summary.json (None if missing or unreadable)."""
  try:
    return json.loads(summary(folder).read_text()).get("request")
  except (OSError, json.JSONDecodeError):
    return None


def selection_matches(folder: PathLike, request: dict[str, Any]) -> bool:
  """Whether the folder holds a finished selection made for exactly `request`."""
  return selection_done(folder) and stored_request(folder) == request
