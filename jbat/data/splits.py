"""The user's task sources (data.adapt / data.valid / data.test) and pool (data.pool), by config.

data.valid and data.test each hold either files (a spec, see `jbat.data.files`) or an integer
count N: N examples split off data.adapt by a seeded permutation (`split_off`). The three task
splits must not share a text (`check_disjoint`). The pool is not read here: `pool_reader` gives
this process's streaming `RecordReader` over it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jbat.data import files, formats
from jbat.data.sources import text_hash
from jbat.errors import JbatError


@dataclasses.dataclass(frozen=True)
class TaskRecords:
  """The task's records: adapt (training), valid (choosing steps), test (reporting only)."""

  adapt: list[files.Record]
  valid: list[files.Record]
  test: list[files.Record]


def parse_split(value: str, key: str) -> int | str | None:
  """data.valid / data.test: "" -> None (no such split), "N" (an integer) -> N, else a spec.

  Raises:
    JbatError naming `key`: an integer < 1.
  """
  value = value.strip()
  if not value:
    return None
  try:
    n = int(value)
  except ValueError:
    return value
  if n < 1:
    raise JbatError(f"config: {key} must be files or a count >= 1, got {value!r}")
  return n


def fields(data: Any) -> formats.Fields:
  """The formats' field names from a config's `data` section."""
  return formats.Fields(text=data.text_field, prompt=data.prompt_field,
                        response=data.response_field, messages=data.messages_field)


def split_off(items: Sequence[Any], n_valid: int, n_test: int, seed: int
              ) -> tuple[list[Any], list[Any], list[Any]]:
  """(adapt, valid, test): a permutation of range(len(items)) by numpy default_rng(seed) gives
  test its first n_test items and valid the next n_valid (each in permutation order); adapt is
  the rest, in input order.

  Raises:
    JbatError: fewer than n_valid + n_test + 1 items.
  """
  n = len(items)
  if n_valid + n_test >= n:
    raise JbatError(f"data.adapt has {n} examples: too few to split off data.valid={n_valid} "
                    f"and data.test={n_test} and keep at least one for training.")
  order = np.random.default_rng(seed).permutation(n)
  test_idx, valid_idx = order[:n_test], order[n_test:n_test + n_valid]
  taken = set(test_idx.tolist()) | set(valid_idx.tolist())
  return ([items[i] for i in range(n) if i not in taken], [items[i] for i in valid_idx],
          [items[i] for i in test_idx])


def check_disjoint(splits: dict[str, Sequence[files.Record]], fmt: str,
                   fields_: formats.Fields = formats.Fields()) -> None:
  """JbatError naming both records when two splits share a text (`formats.record_text`, compared
  after whitespace normalisation, see `jbat.data.sources.text_hash`)."""
  seen: dict[str, tuple[str, files.Record]] = {}
  for name, records in splits.items():
    mine: dict[str, files.Record] = {}
    for r in records:
      mine.setdefault(text_hash(formats.record_text(r, fmt, fields_)), r)
    for h, r in mine.items():
      if h in seen:
        other_name, other = seen[h]
        raise JbatError(f"{name} overlaps {other_name}: {r.where} has the same text as "
                        f"{other.where}.")
    for h, r in mine.items():
      seen[h] = (name, r)


def load_task(data: Any, seed: int) -> TaskRecords:
  """Reads data.adapt (and data.valid / data.test: files or counts split off adapt, see
  `split_off`) in `data.format`, and checks the splits share no text.

  Args:
    data: a config's `data` section.
    seed: the split's seed (the config's `seed`).
  """
  fmt = data.format
  f = fields(data)
  need = formats.required_fields(fmt, f)

  def read(spec: str, key: str) -> list[files.Record]:
    return files.read_all(spec, fields=need, text_field=f.text, id_field=data.id_field, what=key)

  if not data.adapt:
    raise JbatError("config: data.adapt is empty: give the task's training examples (files).")
  adapt = read(data.adapt, "data.adapt")
  valid_spec = parse_split(data.valid, "data.valid")
  test_spec = parse_split(data.test, "data.test")
  counts = [s if isinstance(s, int) else 0 for s in (valid_spec, test_spec)]
  adapt, valid, test = split_off(adapt, counts[0], counts[1], seed) if any(counts) \
      else (adapt, [], [])
  if isinstance(valid_spec, str):
    valid = read(valid_spec, "data.valid")
  if isinstance(test_spec, str):
    test = read(test_spec, "data.test")
  check_disjoint({"data.adapt": adapt, "data.valid": valid, "data.test": test}, fmt, f)
  return TaskRecords(adapt=adapt, valid=valid, test=test)


def pool_reader(data: Any, shard_index: int = 0, shard_count: int = 1) -> files.RecordReader:
  """This process's streaming reader over data.pool (in data.pool_format's fields)."""
  f = fields(data)
  return files.RecordReader(data.pool, fields=formats.required_fields(data.pool_format, f),
                            text_field=f.text, id_field=data.id_field, shard_index=shard_index,
                            shard_count=shard_count, what="data.pool")


def encode_task(records: Sequence[files.Record], data: Any, tokenizer: Any, max_len: int,
                framing: str | None = None) -> tuple[list[dict], formats.EncodeStats]:
  """`formats.encode_records` of task records in data.format with the config's fields."""
  return formats.encode_records(records, tokenizer, max_len, data.format, fields(data), framing)


def pool_chunks(reader: files.RecordReader, data: Any, tokenizer: Any, max_len: int,
                chunk_size: int, framing: str | None = None
                ) -> Iterator[tuple[list[files.Record], list[dict], formats.EncodeStats]]:
  """Streams a pool: per chunk of `chunk_size` records, (the records kept, their encoded
  examples (data.pool_format), the chunk's EncodeStats). Records left out (cut / empty) are
  dropped from both lists, so records[i] is the source of examples[i]."""
  f = fields(data)
  for chunk in reader.chunks(chunk_size):
    examples, stats = formats.encode_records(chunk, tokenizer, max_len, data.pool_format, f,
                                             framing)
    dropped = set(stats.cut_ids) | set(stats.empty_ids)
    kept = [r for r in chunk if r.id not in dropped] if dropped else chunk
    yield kept, examples, stats


def validate(data: Any) -> None:
  """Checks the own-data keys of a config's `data` section (before any work): formats, counts,
  and that every spec resolves to files. Raises JbatError naming the key."""
  formats.check_format(data.format, "config: data.format")
  formats.check_format(data.pool_format, "config: data.pool_format")
  for key in ("valid", "test"):
    spec = parse_split(data[key], f"data.{key}")
    if spec is not None and not data.adapt:
      raise JbatError(f"config: data.{key} is set but data.adapt is empty.")
    if isinstance(spec, str):
      files.resolve(spec, f"config: data.{key}")
  for key in ("adapt", "pool"):
    if data[key]:
      files.resolve(data[key], f"config: data.{key}")
  for key in ("text_field", "prompt_field", "response_field", "messages_field"):
    if not data[key]:
      raise JbatError(f"config: data.{key} must not be empty.")
