"""Text sources for jbat: documents, loaders, deduplication and the adaptation task split.

A corpus is a `list[Document]`. Document ids are deterministic functions of the source (an
ordinal over a sorted walk of the files, or a field of the input), so the same files give the
same ids on every run and every machine: the selection manifest refers to backbone examples by
these ids.

The default corpus is Debian's `fortunes` + `fortunes-min` packages: 43 category files of short
texts (~15k documents once split on "%" lines). A category plays the role of a domain: one
domain's documents form the scarce adaptation set `D_A` (plus a held-out set), everything else
forms the backbone pool `D_B`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from jbat.errors import JbatError

SYSTEM_FORTUNES = pathlib.Path("/usr/share/games/fortunes")
MIN_FORTUNE_CATEGORIES = 40
FORTUNE_PACKAGES = ("fortunes", "fortunes-min")


@dataclasses.dataclass(frozen=True)
class Document:
  """One text example.

  Attributes:
    id: stable integer id (deterministic from the source, unique within a corpus).
    text: the document text.
    source: where it came from ("fortunes", a file name, ...).
    label: optional domain / category label (e.g. the fortune category).
  """

  id: int
  text: str
  source: str
  label: str | None = None


@dataclasses.dataclass(frozen=True)
class Task:
  """An adaptation task: scarce adaptation set, held-out set, and the backbone pool.

  The three lists are disjoint (by document id and by normalised text, see `dedup`).
  """

  adapt: list[Document]
  heldout: list[Document]
  pool: list[Document]


# ----------------------------------------------------------------------------- fortunes


def _is_fortune_category(path: pathlib.Path) -> bool:
  """A category file: a regular non-symlink file that is not a `.dat` index or `.u8` link."""
  return (
      path.is_file()
      and not path.is_symlink()
      and path.suffix not in (".dat", ".u8")
      and not path.name.startswith(".")
  )


def _count_categories(directory: pathlib.Path) -> int:
  if not directory.is_dir():
    return 0
  return sum(1 for p in directory.iterdir() if _is_fortune_category(p))


def _run(cmd: Sequence[str], cwd: str | os.PathLike, packages: Sequence[str],
         fix: str) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(
        list(cmd), cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
  except FileNotFoundError as e:
    raise JbatError(
        f"`{cmd[0]}` is not installed: cannot fetch the Debian package(s) {' '.join(packages)}. "
        f"Install them (`apt-get install {' '.join(packages)}`), or {fix}"
    ) from e


def fetch_debian_folder(packages: Sequence[str], folder: str, target: pathlib.Path,
                        complete: Callable[[pathlib.Path], bool], fix: str) -> pathlib.Path:
  """Fetches Debian packages without root and installs one of their folders as `target`.

  `apt-get download <packages>` (as root with empty apt lists: `apt-get update` once, then
  again), `dpkg -x` of every .deb into a temporary folder beside `target`, then the unpacked
  `folder` (e.g. "usr/share/games/fortunes") is checked with `complete` and renamed atomically
  to `target`, so an interrupted fetch leaves no half-written copy, and a run that fetches
  while another one does keeps the first complete copy (never deleting one in use). `fix` ends every error
  message (what the user can do instead).

  Raises:
    JbatError: apt-get / dpkg are missing or fail, or the unpacked folder is incomplete.
  """
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-tmp-") as tmp:
    tmp = pathlib.Path(tmp)
    download = tmp / "debs"
    download.mkdir()
    os.chmod(tmp, 0o755)
    os.chmod(download, 0o777)  # lets apt's unprivileged `_apt` user write there when root
    cmd = ["apt-get", "download", *packages]
    result = _run(cmd, download, packages, fix)
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
      _run(["apt-get", "update"], download, packages, fix)  # fresh containers: empty lists
      result = _run(cmd, download, packages, fix)
    debs = sorted(download.glob("*.deb"))
    if result.returncode != 0 or len(debs) < len(packages):
      raise JbatError(
          f"`{' '.join(cmd)}` failed (exit {result.returncode}): {result.stderr.strip()[-500:]}"
          f"\nFix: run `apt-get update` as root, or {fix}")
    extract = tmp / "root"
    for deb in debs:
      result = _run(["dpkg", "-x", str(deb), str(extract)], tmp, packages, fix)
      if result.returncode != 0:
        raise JbatError(f"`dpkg -x {deb.name}` failed (exit {result.returncode}): "
                        f"{result.stderr.strip()}. Install dpkg, or {fix}")
    unpacked = extract / folder
    if not complete(unpacked):
      raise JbatError(f"{' '.join(packages)} unpacked to {unpacked} without the expected "
                      f"files; {fix}")
    if complete(target):  # another run fetched it meanwhile: keep that copy (in use)
      return target
    if target.exists():  # an incomplete copy left by hand: moved aside, deleted with tmp
      os.replace(target, tmp / "stale")
    try:
      os.replace(unpacked, target)
    except OSError:
      if not complete(target):  # not a concurrent run that just put a complete copy there
        raise
  return target


def fortunes_dir(cache_dir: str | os.PathLike) -> pathlib.Path:
  """Returns a directory holding the Debian `fortunes` + `fortunes-min` category files.

  Order of preference: the system copy (/usr/share/games/fortunes, if it holds >= 40
  categories); the cached copy `cache_dir/fortunes`; otherwise the packages are fetched into
  it by `fetch_debian_folder` (apt-get download + dpkg -x, atomic rename).

  Raises:
    JbatError: apt-get / dpkg are missing or fail (the message says how to fix it).
  """
  if _count_categories(SYSTEM_FORTUNES) >= MIN_FORTUNE_CATEGORIES:
    return SYSTEM_FORTUNES
  target = pathlib.Path(cache_dir) / "fortunes"
  if _count_categories(target) >= MIN_FORTUNE_CATEGORIES:
    return target
  return fetch_debian_folder(
      FORTUNE_PACKAGES, "usr/share/games/fortunes", target,
      lambda d: _count_categories(d) >= MIN_FORTUNE_CATEGORIES,
      f"copy the fortune files (one file per category, fortunes separated by '%' lines) of "
      f"/usr/share/games/fortunes from a machine that has them into {target}.")


def parse_fortunes(text: str) -> list[str]:
  """Splits a fortune file into fortunes: separators are lines holding only "%".

  Each fortune is stripped of surrounding whitespace; empty ones are dropped.
  """
  chunks, current = [], []
  for line in text.splitlines():
    if line.strip() == "%":
      chunks.append("\n".join(current))
      current = []
    else:
      current.append(line)
  chunks.append("\n".join(current))
  return [c.strip() for c in chunks if c.strip()]


def load_fortunes(directory: str | os.PathLike) -> list[Document]:
  """Loads every fortune category file in `directory` (not recursive).

  Skipped: `*.dat` (strfile indices), `*.u8` (symlinks to the text), symlinks, directories.
  label = file name = category; source = "fortunes"; ids are the ordinal over (sorted file
  name, position in the file), so they are stable across runs and machines.

  Raises:
    JbatError: the folder is missing or holds no category files.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise JbatError(f"fortunes folder {directory} does not exist.")
  files = sorted((p for p in directory.iterdir() if _is_fortune_category(p)), key=lambda p: p.name)
  if not files:
    raise JbatError(
        f"fortunes folder {directory} holds no category files (expected files of fortunes "
        f"separated by '%' lines)."
    )
  docs = []
  for path in files:
    text = path.read_bytes().decode("utf-8", errors="replace")
    for fortune in parse_fortunes(text):
      docs.append(Document(id=len(docs), text=fortune, source="fortunes", label=path.name))
  return docs


# ----------------------------------------------------------------------------- other formats


def load_text_folder(directory: str | os.PathLike) -> list[Document]:
  """One document per `*.txt` file under `directory` (recursive, sorted by relative path).

  label = the parent folder's path relative to `directory` (None for files at the root);
  source = the file's relative path; id = ordinal in the sorted walk.

  Raises:
    JbatError: the folder is missing or has no .txt files, or a file is not valid UTF-8.
  """
  root = pathlib.Path(directory)
  if not root.is_dir():
    raise JbatError(f"text folder {root} does not exist.")
  files = sorted(p for p in root.rglob("*.txt") if p.is_file())
  if not files:
    raise JbatError(f"text folder {root} holds no *.txt files.")
  docs = []
  for i, path in enumerate(files):
    rel = path.relative_to(root)
    parent = rel.parent.as_posix()
    try:
      text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
      raise JbatError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason}).") from None
    docs.append(
        Document(
            id=i,
            text=text,
            source=rel.as_posix(),
            label=None if parent == "." else parent,
        )
    )
  return docs


def load_jsonl(
    path: str | os.PathLike,
    text_field: str = "text",
    label_field: str | None = None,
    id_field: str | None = None,
) -> list[Document]:
  """Loads a JSON-lines file: one JSON object per line, blank lines skipped.

  id = the integer in `id_field` if given, else the 0-based ordinal among non-blank lines.
  label = str(record[label_field]) if `label_field` is given (None when absent in a record).
  source = the file name.

  Raises:
    JbatError: unreadable file, a line that is not valid UTF-8 or not a JSON object, a missing
      / non-string text field, a missing / non-integer id field, or duplicate ids (all name
      file + line).
  """
  path = pathlib.Path(path)
  try:
    lines = path.read_bytes().splitlines()  # Lines end at \n, \r\n or \r.
  except OSError as e:
    raise JbatError(f"cannot read JSONL file {path}: {e}") from e
  docs, seen = [], set()
  for lineno, raw in enumerate(lines, start=1):
    where = f"{path}, line {lineno}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise JbatError(f"{where}: not valid UTF-8 (byte {e.start}: {e.reason}).") from None
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise JbatError(f"{where}: not valid JSON ({e.msg}).") from e
    if not isinstance(record, dict):
      raise JbatError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    text = record.get(text_field)
    if not isinstance(text, str):
      what = "missing" if text_field not in record else f"a {type(text).__name__}"
      raise JbatError(f"{where}: text field {text_field!r} is {what}, expected a string.")
    if id_field is None:
      doc_id = len(docs)
    else:
      doc_id = record.get(id_field)
      if isinstance(doc_id, bool) or not isinstance(doc_id, int):
        raise JbatError(f"{where}: id field {id_field!r} must be an integer, got {doc_id!r}.")
      if doc_id in seen:
        raise JbatError(f"{where}: duplicate id {doc_id} in field {id_field!r}.")
      seen.add(doc_id)
    label = None
    if label_field is not None and record.get(label_field) is not None:
      label = str(record[label_field])
    docs.append(Document(id=doc_id, text=text, source=path.name, label=label))
  return docs


# ----------------------------------------------------------------------------- dedup + task


def normalise_text(text: str) -> str:
  """Strips and collapses every run of whitespace to a single space."""
  return " ".join(text.split())


def text_hash(text: str) -> str:
  """sha256 hex digest of the normalised text (see `normalise_text`)."""
  return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()


def dedup(docs: Iterable[Document]) -> list[Document]:
  """Drops exact duplicates by normalised text hash, keeping the lowest-id copy.

  The output is sorted by id.
  """
  kept: dict[str, Document] = {}
  for doc in sorted(docs, key=lambda d: d.id):
    kept.setdefault(text_hash(doc.text), doc)
  return sorted(kept.values(), key=lambda d: d.id)


def make_task(
    docs: Iterable[Document],
    domain: str,
    n_adapt: int,
    n_heldout: int,
    seed: int,
    label_field_name: str = "domain",
) -> Task:
  """Splits a labelled corpus into an adaptation task.

  docs are deduplicated first. The documents labelled `domain` are permuted by
  `numpy.random.default_rng(seed)` (in id order before the permutation); the first `n_adapt`
  form `adapt`, the next `n_heldout` form `heldout`; `pool` is every other document (the other
  domains and the rest of this domain), sorted by id. `split_task` adds a validation split.

  Args:
    label_field_name: what a label is called in error messages ("domain", "category", ...).

  Raises:
    JbatError: unknown domain (lists the available ones), n_adapt <= 0, n_heldout < 0,
      fewer than n_adapt + n_heldout documents in the domain, or a pool with no text left
      (every other document empty or whitespace after dedup; names the sources).
  """
  task, test = split_task(docs, domain, n_adapt, 0, n_heldout, seed, label_field_name)
  return dataclasses.replace(task, heldout=test)


def split_task(
    docs: Iterable[Document],
    domain: str,
    n_adapt: int,
    n_valid: int,
    n_test: int,
    seed: int,
    label_field_name: str = "domain",
) -> tuple[Task, list[Document]]:
  """Splits a labelled corpus into an adaptation task with a validation split, and a test split.

  docs are deduplicated first. The documents labelled `domain` are permuted by
  `numpy.random.default_rng(seed)` (in id order before the permutation): the first `n_adapt`
  form `adapt`, the next `n_test` the test split, the next `n_valid` the task's `heldout`
  (the validation split: it chooses steps and defaults); `pool` is every other document, sorted
  by id. The test split is returned beside the task, never inside it, so selection (which takes
  a Task) cannot read it. With n_valid = 0, adapt and test are `make_task`'s adapt and heldout
  for the same seed (the test documents do not move when a validation split is added).

  Raises:
    JbatError: as `make_task` (n_valid < 0 too; the domain needs n_adapt + n_valid + n_test).
  """
  docs = dedup(docs)
  labels = sorted({d.label for d in docs if d.label is not None})
  if domain not in labels:
    raise JbatError(
        f"{label_field_name} {domain!r} not found; available {label_field_name}s: "
        f"{', '.join(labels) if labels else '(none: the documents have no labels)'}."
    )
  if n_adapt <= 0:
    raise JbatError(f"empty adaptation set: n_adapt must be > 0, got {n_adapt}.")
  if n_test < 0 or n_valid < 0:
    raise JbatError(f"n_heldout must be >= 0, got {n_test + n_valid}.")
  in_domain = [d for d in docs if d.label == domain]
  need = n_adapt + n_test + n_valid
  if len(in_domain) < need:
    raise JbatError(
        f"{label_field_name} {domain!r} has {len(in_domain)} documents (after dedup), but "
        f"n_adapt + n_heldout = {n_adapt} + {n_test + n_valid} = {need} are needed."
    )
  order = np.random.default_rng(seed).permutation(len(in_domain))
  shuffled = [in_domain[i] for i in order]
  adapt = shuffled[:n_adapt]
  test = shuffled[n_adapt:n_adapt + n_test]
  valid = shuffled[n_adapt + n_test:need]
  taken = {d.id for d in (*adapt, *test, *valid)}
  pool = [d for d in docs if d.id not in taken]
  if not any(d.text.strip() for d in pool):
    names = sorted({d.source for d in docs})
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise JbatError(
        f"the backbone pool of {shown} is empty after cleaning: the documents outside the "
        f"adaptation and held-out sets ({len(pool)} after dedup) hold no text.")
  return Task(adapt=adapt, heldout=valid, pool=pool), test
