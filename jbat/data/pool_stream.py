"""A pool given as files (data.pool), streamed: read, filtered and tokenized a chunk at a time.

`FilePool` is what scoring and selection need of the user's pool without holding it:

  local_examples(i, n)  this process's share of the rows (`files.plan`), tokenized on the fly
                        in chunks of CHUNK records, as encoded examples (`jbat.data.formats`)
                        that also carry their location ("file": index into `files`, "row") and
                        "hash" (a 63-bit hash of the normalised text, for text dedup); records
                        that are near-duplicates of a task example (`near_dup`, a
                        `jbat.data.neardup.Index`), whose text equals a task example's,
                        repeated ids and records cut away by max_len are left out and counted
                        (`counts`, this process's share);
  read(locations)       re-reads the given (file index, row) records: the selected records for
                        the training mixture and the manifest, a control or feature sample;
  sample(n, seed)       n usable records drawn uniformly without holding the pool: positions
                        from the per-file row counts, in a seeded order, until n are usable
                        (the random arm, the control surrogate);
  fingerprint           what the streamed scores depend on: the files (path, size, mtime), the
                        format, fields, id field, max_len, tokenizer, task texts and the
                        near-duplicate filter.

The near-duplicate, same-text and max_len filters decide on the record alone, so
`local_examples`, `read` and `sample` leave out the same records whichever process reads them:
the near-duplicate drops, the random arm's draw and the selection's re-reads agree on 1 and on
several processes (repeated ids are settled by the merge by id).

A location is the record's place in the one-process read order (file index in `files`, row in
the file), so everything keyed by it or by id is the same however the reading is sharded.
Memory: one chunk of records and their token ids at a time; `row_counts` (one int per file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jbat.data import files, formats, neardup, sources
from jbat.errors import JbatError

CHUNK = 512  # Records read and tokenized at a time.


@dataclasses.dataclass
class PoolCounts:
  """What a pass over (a share of) the pool read and left out."""

  read: int = 0
  kept: int = 0
  cut_by_max_len: int = 0
  empty: int = 0
  same_text_as_task: int = 0
  repeated_id: int = 0
  near_duplicate: int = 0

  def add(self, other: "PoolCounts") -> None:
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  def as_array(self) -> np.ndarray:
    return np.asarray([getattr(self, f.name) for f in dataclasses.fields(self)], np.int64)

  @classmethod
  def from_array(cls, a: np.ndarray) -> "PoolCounts":
    return cls(*(int(x) for x in a))


class FilePool:
  """The user's pool files, streamed (see the module docstring).

  Args:
    spec: data.pool (comma-separated files, globs, folders).
    fmt: data.pool_format; fields: the formats' field names; id_field: data.id_field.
    tokenizer, max_len: the encoding (formats.encode_records; framing from the tokenizer).
    task_texts: the task's texts (adapt, valid, test): pool records with one of these texts
      are left out.
    near_dup: a `jbat.data.neardup.Index` of the task's texts: pool records that are
      near-duplicates of one are left out before tokenizing (None: no such filter).
  Raises:
    JbatError: see `files.RecordReader` (a glob matching nothing, every file empty, ...).
  """

  def __init__(self, spec: str, *, fmt: str, fields: formats.Fields, id_field: str,
               tokenizer: Any, max_len: int, task_texts: Sequence[str] = (),
               near_dup: neardup.Index | None = None):
    self.spec, self.fmt, self.fields, self.id_field = spec, fmt, fields, id_field
    self.near_dup = near_dup
    self.tokenizer, self.max_len = tokenizer, max_len
    self.need = formats.required_fields(fmt, fields)
    probe = self._reader()
    self.files = probe.nonempty
    self.empty_files = probe.empty_files
    self._index = {f: i for i, f in enumerate(self.files)}
    self._check_columns()
    self.task_hashes = {sources.text_hash(t) for t in task_texts}
    self._row_counts: list[int] | None = None

  def _check_columns(self) -> None:
    """JbatError now (not mid-scoring) for a Parquet file without a needed column (reads only
    the files' footers)."""
    need = [*self.need, *([self.id_field] if self.id_field else [])]
    for f in self.files:
      if files.kind(f) == "parquet":
        names = set(files._parquet(f, "data.pool").schema_arrow.names)  # noqa: SLF001
        missing = [c for c in need if c not in names]
        if missing:
          raise JbatError(f"data.pool: {f}: Parquet file has no column {missing[0]!r} "
                          f"(columns: {', '.join(sorted(names))}).")

  def _reader(self, shard_index: int = 0, shard_count: int = 1) -> files.RecordReader:
    return files.RecordReader(self.spec, fields=self.need, text_field=self.fields.text,
                              id_field=self.id_field, shard_index=shard_index,
                              shard_count=shard_count, what="data.pool")

  # --------------------------------------------------------------------------- identity

  @property
  def fingerprint(self) -> str:
    """sha256 (16 hex) of the files' paths, sizes and mtimes, the encoding settings, the
    tokenizer's vocabulary and special tokens, the task texts left out and the near-duplicate
    filter (`neardup.Index.fingerprint`)."""
    h = hashlib.sha256()
    for f in self.files:
      st = os.stat(f)
      h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(repr((self.fmt, dataclasses.astuple(self.fields), self.id_field, self.max_len,
                   formats.default_framing(self.tokenizer))).encode())
    vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
    h.update(repr(sorted(vocab.items())).encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
      h.update(repr(getattr(self.tokenizer, name, None)).encode())
    for t in sorted(self.task_hashes):
      h.update(t.encode())
    if self.near_dup is not None:
      h.update(f"near_dup\0{self.near_dup.fingerprint}".encode())
    return h.hexdigest()[:16]

  # --------------------------------------------------------------------------- streaming

  def _encode(self, chunk: Sequence[files.Record], counts: PoolCounts, seen: set[int] | None
              ) -> list[dict[str, Any]]:
    """The usable examples of a chunk of records (counted into `counts`), with their
    location, text hash and text. Near-duplicates of a task text are left out first (not
    tokenized)."""
    counts.read += len(chunk)
    if self.near_dup is not None and chunk:
      drop = self.near_dup.find([formats.record_text(r, self.fmt, self.fields)
                                 for r in chunk]).drop
      counts.near_duplicate += int(drop.sum())
      chunk = [r for r, d in zip(chunk, drop) if not d]
    examples, st = formats.encode_records(chunk, self.tokenizer, self.max_len, self.fmt,
                                          self.fields)
    counts.cut_by_max_len += st.cut
    counts.empty += st.empty
    by_id = {r.id: r for r in chunk}
    out = []
    for ex in examples:
      r = by_id[ex["id"]]
      text = formats.record_text(r, self.fmt, self.fields)
      h = sources.text_hash(text)
      if h in self.task_hashes:
        counts.same_text_as_task += 1
        continue
      if seen is not None:
        if r.id in seen:
          counts.repeated_id += 1
          continue
        seen.add(r.id)
      ex.update(file=self._index[r.file], row=r.row, hash=int(h[:15], 16), text=text,
                record=r)  # hash: 60 bits of the text hash, for exact-text dedup.
      out.append(ex)
    counts.kept += len(out)
    return out

  def local_examples(self, shard_index: int = 0, shard_count: int = 1,
                     counts: PoolCounts | None = None) -> Iterator[dict[str, Any]]:
    """This process's usable examples, in its read order (see the module docstring)."""
    counts = PoolCounts() if counts is None else counts
    # Ids from file + row are unique by construction; ids from a field may repeat (then the
    # set of ids seen grows with the share; repeats across shares are dropped at the merge,
    # `stream.ScoreTable.sorted_by_id`).
    seen: set[int] | None = set() if self.id_field else None
    for chunk in self._reader(shard_index, shard_count).chunks(CHUNK):
      yield from self._encode(chunk, counts, seen)

  def row_counts(self) -> list[int]:
    """Rows of each (non-empty) file, in `files` order (counted once, then kept)."""
    if self._row_counts is None:
      self._row_counts = [files.count_rows(f, "data.pool") for f in self.files]
    return self._row_counts

  def read(self, locations: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """The usable examples at the given (file index, row) locations, in the order given
    (locations of unusable records are left out). Reads each file once, only the row range
    spanning its requested rows."""
    want: dict[int, list[int]] = {}
    for f, r in locations:
      want.setdefault(int(f), []).append(int(r))
    got: dict[tuple[int, int], dict[str, Any]] = {}
    counts = PoolCounts()
    for f, rows in sorted(want.items()):
      rows_set = set(rows)
      reader = self._reader()
      reader.spans = [files.Span(self.files[f], min(rows), max(rows) + 1)]
      chunk: list[files.Record] = []
      for rec in reader:
        if rec.row in rows_set:
          chunk.append(rec)
        if len(chunk) == CHUNK:
          got.update({(ex["file"], ex["row"]): ex for ex in self._encode(chunk, counts, None)})
          chunk = []
      if chunk:
        got.update({(ex["file"], ex["row"]): ex for ex in self._encode(chunk, counts, None)})
    return [got[(int(f), int(r))] for f, r in locations if (int(f), int(r)) in got]

  def sample(self, n: int, seed: int) -> list[dict[str, Any]]:
    """n usable examples drawn uniformly (fewer if the pool has fewer): the positions of the
    one-process order in a numpy Generator(seed) permutation, read in blocks until n are
    usable (repeated ids kept once). Memory: one int64 per pool row for the permutation."""
    counts = np.asarray(self.row_counts(), np.int64)
    total = int(counts.sum())
    starts = np.concatenate([[0], np.cumsum(counts)])
    order = np.random.default_rng(seed).permutation(total)
    out, ids, lo = [], set(), 0
    while len(out) < n and lo < total:
      block = order[lo:lo + max(2 * (n - len(out)), 64)]
      lo += len(block)
      f = np.searchsorted(starts, block, side="right") - 1
      for ex in self.read(list(zip(f.tolist(), (block - starts[f]).tolist()))):
        if ex["id"] not in ids and len(out) < n:
          ids.add(ex["id"])
          out.append(ex)
    return out


@dataclasses.dataclass(frozen=True)
class PoolDocument(sources.Document):
  """A pool document read from the user's files: `manifest_fields` (uid, file, row, text) go
  into the selection manifest (`selection.write_manifest`)."""

  manifest_fields: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)


def manifest_fields(ex: dict[str, Any]) -> dict[str, Any]:
  """What a selected pool example adds to its manifest record: uid, file, row, text."""
  r = ex["record"]
  return {"uid": r.uid, "file": r.file, "row": r.row, "text": ex["text"]}


def document(ex: dict[str, Any]) -> PoolDocument:
  """The `PoolDocument` of a streamed pool example (for the manifest)."""
  return PoolDocument(id=ex["id"], text=ex["text"], source=ex["record"].file,
                      manifest_fields=manifest_fields(ex))


def training_example(ex: dict[str, Any]) -> dict[str, Any]:
  """The encoded example alone (id, ids, weights), without the streaming extras."""
  return {k: v for k, v in ex.items() if k in ("id", "ids", "weights")}

