"""Records read from the user's own files: JSONL, JSONL.gz, Parquet, or a folder of .txt files.

A source spec is one or more comma-separated paths, globs or folders, e.g.
"data/pool/*.jsonl.gz,extra.parquet". `resolve` expands it to an ordered list of files: the
items in the order given, each glob's matches sorted, duplicates dropped. A folder is one file
whose rows are its *.txt files (recursive, sorted by relative path), each row the file's text
under the text field.

`RecordReader` streams the records of a spec without holding them all: it reads one file at a
time (Parquet in record batches, JSONL line by line) and yields `Record`s in a deterministic
order, or lists of them in fixed-size chunks (`chunks`). With `shard_count` processes each reads
only its share (`plan`): whole files (file i goes to process i mod shard_count) when there are at
least as many non-empty files as processes, else contiguous row ranges of every file. Either way
every row is read by exactly one process (the union of the shares is the one-process read; its
order differs, so merge results by id).

Each record has a stable id: the value of `id_field` when given (`uid` = str(value); `id` = the
value if it is an integer, else a 63-bit hash of uid), else uid = "<file>:<row>" (row = 0-based
index among the file's non-blank lines / Parquet rows / the folder's sorted .txt files) and id
= the 63-bit hash of uid. The id does not depend on how the work is sharded.

An empty file (no rows) among non-empty ones is skipped and counted (`empty_files`); a spec
whose files are all empty is an error. Errors are `JbatError`s naming the spec's config key,
the file, and the line or field.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io as _io
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

from jbat.errors import JbatError

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_PARQUET_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class Record:
  """One row of a source file.

  Attributes:
    uid: stable string id (the id field's value, or "<file>:<row>").
    id: stable integer id (the id field's integer, or a 63-bit hash of uid).
    file: the file (or folder) it was read from, as resolved from the spec.
    row: 0-based row index inside that file.
    line: 1-based line number for JSONL (None for other kinds), for error messages.
    fields: the record's fields (a text folder's rows have just the text field).
  """

  uid: str
  id: int
  file: str
  row: int
  line: int | None
  fields: dict[str, Any]

  @property
  def where(self) -> str:
    """"file, line N" (JSONL) or "file, row N": where the record is, for error messages."""
    if self.line is not None:
      return f"{self.file}, line {self.line}"
    return f"{self.file}, row {self.row}"


@dataclasses.dataclass(frozen=True)
class Span:
  """Rows [start, stop) of one file (stop None: to the end)."""

  file: str
  start: int = 0
  stop: int | None = None


def stable_id(uid: str) -> int:
  """A 63-bit non-negative integer hash of a string id (blake2b), the same on every machine."""
  digest = hashlib.blake2b(uid.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def kind(path: str | os.PathLike) -> str:
  """"jsonl", "jsonl.gz", "parquet" or "folder" by the path's name; JbatError for others."""
  p = pathlib.Path(path)
  if p.is_dir():
    return "folder"
  name = p.name.lower()
  for suffix in (".jsonl.gz", ".jsonl", ".parquet"):
    if name.endswith(suffix):
      return suffix[1:]
  raise JbatError(f"{p}: unsupported file type (expected {', '.join(SUFFIXES)} or a folder of "
                  ".txt files).")


def split_spec(spec: str) -> list[str]:
  """The comma-separated items of a spec, stripped, empty ones dropped."""
  return [s.strip() for s in spec.split(",") if s.strip()]


def resolve(spec: str, what: str = "data.pool") -> list[str]:
  """Expands a spec (comma-separated files, globs, folders) to its ordered list of files.

  Raises:
    JbatError naming `what`: an empty spec, a glob matching nothing, a missing path, or a file
      of an unsupported type.
  """
  items = split_spec(spec)
  if not items:
    raise JbatError(f"{what}: no files given.")
  out: list[str] = []
  for item in items:
    expanded = os.path.expanduser(item)
    if glob.has_magic(expanded):
      matches = sorted(glob.glob(expanded, recursive=True))
      if not matches:
        raise JbatError(f"{what}: {item!r} matches no file.")
    else:
      if not os.path.exists(expanded):
        raise JbatError(f"{what}: {item!r} does not exist.")
      matches = [expanded]
    for m in matches:
      try:
        kind(m)
      except JbatError as e:
        raise JbatError(f"{what}: {e}") from None
      if m not in out:
        out.append(m)
  return out


# ----------------------------------------------------------------------------- per kind


def _folder_files(path: str) -> list[pathlib.Path]:
  root = pathlib.Path(path)
  return sorted((p for p in root.rglob("*.txt") if p.is_file()),
                key=lambda p: p.relative_to(root).as_posix())


def _parquet(path: str, what: str):
  import pyarrow.parquet as pq  # Deferred: only Parquet sources need it.
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001  pyarrow raises several types for unreadable files.
    raise JbatError(f"{what}: {path}: not a readable Parquet file ({e}).") from None


def _open_text(path: str, what: str):
  try:
    if path.lower().endswith(".gz"):
      return _io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")
  except OSError as e:
    raise JbatError(f"{what}: cannot read {path}: {e}") from None


def _jsonl_lines(path: str, what: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, line) of the non-blank lines of a JSONL(.gz) file."""
  lineno = 0
  with _open_text(path, what) as f:
    try:
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          yield lineno, line
    except (OSError, EOFError, gzip.BadGzipFile) as e:
      raise JbatError(f"{what}: {path}: cannot read past line {lineno}: {e}") from None


def count_rows(path: str, what: str = "data.pool") -> int:
  """Rows of one resolved file: non-blank lines (JSONL), rows (Parquet), .txt files (folder)."""
  k = kind(path)
  if k == "parquet":
    return _parquet(path, what).metadata.num_rows
  if k == "folder":
    return len(_folder_files(path))
  return sum(1 for _ in _jsonl_lines(path, what))


def is_empty(path: str, what: str = "data.pool") -> bool:
  """True when the file has no rows (cheap: reads at most one line / the Parquet footer)."""
  k = kind(path)
  if k == "parquet":
    return _parquet(path, what).metadata.num_rows == 0
  if k == "folder":
    return not _folder_files(path)
  return next(iter(_jsonl_lines(path, what)), None) is None


def _parse_json(line: str, where: str) -> dict[str, Any]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise JbatError(f"{where}: not valid JSON ({e.msg}).") from None
  if not isinstance(record, dict):
    raise JbatError(f"{where}: expected a JSON object, got {type(record).__name__}.")
  return record


def _rows(span: Span, *, fields: Sequence[str], text_field: str, what: str
          ) -> Iterator[tuple[int, int | None, dict[str, Any]]]:
  """(row, line, fields) of the rows [start, stop) of one file, in order."""
  path, start, stop = span.file, span.start, span.stop
  k = kind(path)
  if k == "folder":
    files = _folder_files(path)[start:stop]
    for row, f in enumerate(files, start=start):
      yield row, None, {text_field: f.read_bytes().decode("utf-8", errors="replace")}
  elif k == "parquet":
    pf = _parquet(path, what)
    names = set(pf.schema_arrow.names)
    missing = [c for c in fields if c not in names]
    if missing:
      raise JbatError(f"{what}: {path}: Parquet file has no column {missing[0]!r} (columns: "
                      f"{', '.join(sorted(names))}).")
    # Only the row groups overlapping [start, stop) are read.
    groups, row, first = [], 0, None
    for g in range(pf.metadata.num_row_groups):
      n = pf.metadata.row_group(g).num_rows
      if row + n > start and (stop is None or row < stop):
        groups.append(g)
        first = row if first is None else first
      row += n
    if not groups:
      return
    row = first
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=groups,
                                 columns=list(fields) or None):
      n = batch.num_rows
      if stop is not None and row >= stop:
        break
      if row + n <= start:
        row += n
        continue
      records = batch.to_pylist()
      for j, rec in enumerate(records):
        r = row + j
        if r >= start and (stop is None or r < stop):
          yield r, None, rec
      row += n
  else:
    for row, (lineno, line) in enumerate(_jsonl_lines(path, what)):
      if row < start:
        continue
      if stop is not None and row >= stop:
        break
      yield row, lineno, _parse_json(line, f"{path}, line {lineno}")


# ----------------------------------------------------------------------------- sharding


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
  """Contiguous [start, stop) ranges splitting n rows into `parts` (sizes differ by <= 1)."""
  base, extra = divmod(n, parts)
  out, start = [], 0
  for i in range(parts):
    stop = start + base + (1 if i < extra else 0)
    out.append((start, stop))
    start = stop
  return out


def plan(files: Sequence[str], shard_index: int = 0, shard_count: int = 1,
         what: str = "data.pool") -> list[Span]:
  """This process's share of the (non-empty) files: whole files i with i mod shard_count ==
  shard_index when len(files) >= shard_count, else rows range shard_index of every file (each
  file split into shard_count contiguous ranges; empty ranges left out)."""
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise JbatError(f"bad shard {shard_index} of {shard_count}: need 0 <= index < count.")
  if len(files) >= shard_count:
    return [Span(f) for i, f in enumerate(files) if i % shard_count == shard_index]
  spans = []
  for f in files:
    start, stop = _ranges(count_rows(f, what), shard_count)[shard_index]
    if stop > start:
      spans.append(Span(f, start, stop))
  return spans


class RecordReader:
  """Streams the records of a spec (this process's share): see the module docstring.

  Args:
    spec: comma-separated files / globs / folders.
    fields: the fields every record needs (Parquet files are checked for these columns and read
      with only them (plus id_field); JSONL records are checked by the format that reads them).
    text_field: the field a folder's .txt text is put under.
    id_field: a field holding each record's stable id ("" for file + row).
    shard_index, shard_count: this process's share (see `plan`).
    what: the config key the spec came from, for error messages.

  Attributes:
    files: every resolved file; nonempty: those with rows; empty_files: those without (skipped).

  Raises:
    JbatError: see `resolve`; every file is empty.
  """

  def __init__(self, spec: str, *, fields: Sequence[str] = ("text",), text_field: str = "text",
               id_field: str = "", shard_index: int = 0, shard_count: int = 1,
               what: str = "data.pool"):
    self.what = what
    self.files = resolve(spec, what)
    self.empty_files = [f for f in self.files if is_empty(f, what)]
    self.nonempty = [f for f in self.files if f not in self.empty_files]
    if not self.nonempty:
      raise JbatError(f"{what}: every file is empty ({', '.join(self.files)}).")
    self.fields = list(dict.fromkeys([*fields, *([id_field] if id_field else [])]))
    self.text_field = text_field
    self.id_field = id_field
    self.spans = plan(self.nonempty, shard_index, shard_count, what)

  def _record(self, file: str, row: int, line: int | None, fields: dict[str, Any]) -> Record:
    if self.id_field:
      where = f"{file}, line {line}" if line is not None else f"{file}, row {row}"
      if kind(file) == "folder":
        raise JbatError(f"{self.what}: {file}: a folder of .txt files has no id field "
                        f"{self.id_field!r}; leave data.id_field empty.")
      value = fields.get(self.id_field)
      if value is None or isinstance(value, (bool, float, list, dict)):
        raise JbatError(f"{self.what}: {where}: id field {self.id_field!r} must be an integer or "
                        f"a string, got {value!r}.")
      uid = str(value)
      rid = value if isinstance(value, int) and value >= 0 else stable_id(uid)
    else:
      uid = f"{file}:{row}"
      rid = stable_id(uid)
    return Record(uid=uid, id=int(rid), file=file, row=row, line=line, fields=fields)

  def __iter__(self) -> Iterator[Record]:
    for span in self.spans:
      for row, line, fields in _rows(span, fields=self.fields, text_field=self.text_field,
                                     what=self.what):
        yield self._record(span.file, row, line, fields)

  def chunks(self, size: int) -> Iterator[list[Record]]:
    """The records in lists of `size` (the last may be shorter); one list in memory at a time."""
    if size < 1:
      raise JbatError(f"chunk size must be >= 1, got {size}.")
    chunk: list[Record] = []
    for rec in self:
      chunk.append(rec)
      if len(chunk) == size:
        yield chunk
        chunk = []
    if chunk:
      yield chunk


def read_all(spec: str, *, fields: Sequence[str] = ("text",), text_field: str = "text",
             id_field: str = "", what: str = "data.adapt") -> list[Record]:
  """Every record of a (small) spec, in order, in one process: the task sources."""
  return list(RecordReader(spec, fields=fields, text_field=text_field, id_field=id_field,
                           what=what))
