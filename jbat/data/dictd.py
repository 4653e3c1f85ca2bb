"""The dictionary task (`data.task = "dictd"`): definition questions from Debian's dictd packages.

A dictd dictionary is two files: `<name>.index`, one line per headword "headword TAB offset TAB
length" (offset and length in dictd's base64: digits A-Z a-z 0-9 + /, most significant first, no
padding), and `<name>.dict.dz`, the entries' text concatenated (gzip; dictzip adds random access
but plain gzip reads it whole). `read_dictionary` gives one `Entry` per distinct (offset, length)
(several headwords may point at one entry: the first in the index is kept), without dictd's
"00-database-*" metadata entries.

The task, fixed before any result was looked at (docs/tasks.md):
  target     one dictionary (`dictd.target`, default the Jargon File, `dict-jargon`); its entries
             with a definition of at least `MIN_CHARS` characters, sorted by headword, are
             permuted by numpy default_rng(dictd.seed): test = the first dictd.n_test, valid =
             the next dictd.n_valid, adapt = the next dictd.n_adapt, oracle = the next
             dictd.n_oracle (0: all the rest).
  examples   chat pairs: user "What does <headword> mean?", assistant = the definition
             (`definition`: the entry without its headword line, dictd's {cross-reference}
             braces removed, whitespace collapsed, cut at the last sentence end within
             dictd.max_chars characters, else at the last space).
  pool       every entry of the other dictionaries (`dictd.pool`), as plain text
             "<headword>: <definition>", minus those whose headword is a valid or test term
             (case-insensitive); with dictd.n_pool > 0 a seeded sample of that many.
  oracle     the target's oracle entries in the pool's plain-text form: more target data (the
             `oracle` arm's documents, never in the pool).

`prepare(config)` fetches the packages into the cache (`jbat.data.sources.fetch_debian_folder`:
apt-get download + dpkg -x, atomic), writes the five JSONL files (atomically) into
<cache>/dictd/task-<hash of the settings>/ and points data.adapt / valid / test / pool / oracle
at them, so the rest of the run is the ordinary own-data path.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jbat import io
from jbat.data import sources
from jbat.errors import JbatError

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(B64)}
MIN_CHARS = 40  # Target entries with a shorter definition (stubs, "See X.") are left out.
QUESTION = "What does {term} mean?"
FORMAT_VERSION = 2  # Bumped when the files' content rule changes (new cache folder).
SPLITS = ("adapt", "valid", "test", "pool", "oracle")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One dictionary entry: its headword (as in the index) and its raw text."""

  headword: str
  text: str


def decode_b64(s: str) -> int:
  """dictd's base64 number: digits of B64, most significant first, no padding."""
  n = 0
  for c in s:
    if c not in _B64_VALUE:
      raise ValueError(f"not a dictd base64 digit: {c!r} in {s!r}")
    n = n * 64 + _B64_VALUE[c]
  return n


def encode_b64(n: int) -> str:
  """The inverse of `decode_b64` (tests write fake dictionaries with it)."""
  digits = B64[n % 64]
  while n >= 64:
    n //= 64
    digits = B64[n % 64] + digits
  return digits


def read_index(path: str | pathlib.Path) -> list[tuple[str, int, int]]:
  """(headword, offset, length) per line of a dictd .index file.

  Raises JbatError naming the file and line for a line without three tab-separated fields or
  with a bad base64 number."""
  out = []
  text = pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
  for lineno, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    parts = line.split("\t")
    try:
      out.append((parts[0], decode_b64(parts[1]), decode_b64(parts[2])))
    except (IndexError, ValueError) as e:
      raise JbatError(f"{path}, line {lineno}: not a dictd index line "
                      f"(headword TAB offset TAB length): {e}") from None
  return out


def read_dictionary(index_path: str | pathlib.Path, dict_path: str | pathlib.Path
                    ) -> list[Entry]:
  """The entries of one dictionary in index order: one per distinct (offset, length), its
  first headword; dictd's "00-database-*" / "00database*" metadata entries left out.

  Raises JbatError for an unreadable .dict.dz or an entry past its end."""
  try:
    with gzip.open(dict_path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise JbatError(f"{dict_path}: not a readable .dict.dz (gzip) file: {e}") from None
  seen, out = set(), []
  for head, offset, length in read_index(index_path):
    if head.startswith(("00-database", "00database")) or (offset, length) in seen:
      continue
    if offset + length > len(data):
      raise JbatError(f"{index_path}: entry {head!r} ends at byte {offset + length}, past the "
                      f"end of {dict_path} ({len(data)} bytes)")
    seen.add((offset, length))
    out.append(Entry(head, data[offset:offset + length].decode("utf-8", errors="replace")))
  return out


def _cut(text: str, max_chars: int) -> str:
  """`text` if it fits max_chars, else cut at the last sentence end ('.', '!' or '?' followed by
  a space) within max_chars, or, when there is none in its second half, at the last space."""
  if len(text) <= max_chars:
    return text
  head = text[:max_chars + 1]
  ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", head)]
  if ends and ends[-1] >= max_chars // 2:
    return head[:ends[-1]].rstrip()
  space = head.rfind(" ", 0, max_chars)
  return (head[:space] if space > 0 else head[:max_chars]).rstrip()


def definition(entry: Entry, max_chars: int) -> str:
  """An entry's definition: the text without its headword (a first line equal to the headword,
  case-insensitive, is dropped; a first line starting "HEADWORD," loses that prefix), dictd's
  {cross-reference} braces removed, whitespace collapsed, cut to max_chars (`_cut`)."""
  lines = entry.text.strip("\n").split("\n")
  head = entry.headword.strip().lower()
  first = lines[0].strip() if lines else ""
  if first.lower() == head:
    lines = lines[1:]
  elif first.lower().startswith(head + ","):
    lines[0] = first[len(head) + 1:]
  text = re.sub(r"[{}]", "", " ".join(lines))
  text = re.sub(r"\s+", " ", text).strip()
  return _cut(text, max_chars)


def chat_pair(term: str, answer: str) -> dict[str, Any]:
  """A chat record: the definition question and its answer."""
  return {"messages": [{"role": "user", "content": QUESTION.format(term=term)},
                       {"role": "assistant", "content": answer}]}


def _term(entry: Entry) -> str:
  return entry.headword.strip().lower()


@dataclasses.dataclass(frozen=True)
class Spec:
  """The task's settings (the config's `dictd` section)."""

  target: str = "jargon"
  pool: tuple[str, ...] = ("foldoc", "devil", "elements")
  n_adapt: int = 32
  n_valid: int = 32
  n_test: int = 64
  n_oracle: int = 256
  n_pool: int = 0
  max_chars: int = 400
  seed: int = 0

  @classmethod
  def from_config(cls, c: Any) -> "Spec":
    return cls(target=c.target, pool=tuple(s.strip() for s in c.pool.split(",") if s.strip()),
               n_adapt=c.n_adapt, n_valid=c.n_valid, n_test=c.n_test, n_oracle=c.n_oracle,
               n_pool=c.n_pool, max_chars=c.max_chars, seed=c.seed)

  def key(self) -> str:
    blob = json.dumps({**dataclasses.asdict(self), "version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_task(target: Sequence[Entry], others: dict[str, Sequence[Entry]], spec: Spec
               ) -> dict[str, list[dict[str, Any]]]:
  """The task's records per split (see the module docstring): adapt / valid / test as chat
  pairs, pool and oracle as {"text", "source", "term"} records.

  Raises JbatError when the target has fewer usable entries than n_test + n_valid + n_adapt
  (+ n_oracle) or the pool ends up empty."""
  usable = sorted(((e, d) for e in target if len(d := definition(e, spec.max_chars)) >= MIN_CHARS),
                  key=lambda ed: ed[0].headword)
  need = spec.n_test + spec.n_valid + spec.n_adapt
  if len(usable) < need + spec.n_oracle or len(usable) <= need:
    raise JbatError(f"dictd: the target {spec.target!r} has {len(usable)} usable entries; "
                    f"n_test + n_valid + n_adapt + n_oracle = {need + spec.n_oracle} (and at "
                    "least one more for the oracle when n_oracle is 0)")
  order = np.random.default_rng(spec.seed).permutation(len(usable)).tolist()
  cuts = np.cumsum([0, spec.n_test, spec.n_valid, spec.n_adapt]).tolist()
  parts = [[usable[i] for i in order[a:b]] for a, b in zip(cuts[:-1], cuts[1:])]
  rest = [usable[i] for i in order[need:]]
  oracle = rest[:spec.n_oracle] if spec.n_oracle else rest
  held_terms = {_term(e) for e, _ in (*parts[0], *parts[1])}
  pool = []
  for name in spec.pool:
    for e in others[name]:
      if _term(e) in held_terms:
        continue
      d = definition(e, spec.max_chars)
      if d:
        pool.append({"text": f"{e.headword}: {d}", "source": name, "term": e.headword})
  if not pool:
    raise JbatError(f"dictd: the pool dictionaries ({', '.join(spec.pool)}) give no entries")
  if spec.n_pool and spec.n_pool < len(pool):
    idx = np.random.default_rng(spec.seed + 1).choice(len(pool), spec.n_pool, replace=False)
    pool = [pool[i] for i in sorted(idx.tolist())]
  out = {name: [{**chat_pair(e.headword, d), "term": e.headword} for e, d in part]
         for name, part in zip(("test", "valid", "adapt"), parts)}
  out["pool"] = pool
  out["oracle"] = [{"text": f"{e.headword}: {d}", "source": spec.target, "term": e.headword}
                   for e, d in oracle]
  return out


def package(name: str) -> str:
  """The Debian package of a dictionary name: "jargon" -> "dict-jargon"."""
  return f"dict-{name}"


def dictionary_files(folder: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
  return folder / f"{name}.index", folder / f"{name}.dict.dz"


def fetch_dictionary(cache: pathlib.Path, name: str) -> pathlib.Path:
  """<cache>/dictd/<name>/ holding <name>.index and <name>.dict.dz (fetched once)."""
  target = cache / "dictd" / name

  def complete(folder: pathlib.Path) -> bool:
    return all(p.is_file() for p in dictionary_files(folder, name))

  if complete(target):
    return target
  fix = (f"put {name}.index and {name}.dict.dz (from the Debian package {package(name)}, "
         f"/usr/share/dictd/) into {target}")
  return sources.fetch_debian_folder([package(name)], "usr/share/dictd", target, complete, fix)


def load(cache: pathlib.Path, name: str) -> list[Entry]:
  return read_dictionary(*dictionary_files(fetch_dictionary(cache, name), name))


def write_task(records: dict[str, list[dict[str, Any]]], folder: pathlib.Path
               ) -> dict[str, pathlib.Path]:
  """Writes each split as <folder>/<split>.jsonl (atomically); returns the paths."""
  paths = {}
  for name in SPLITS:
    paths[name] = folder / f"{name}.jsonl"
    io.write_text_atomic(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                              for r in records[name]))
  return paths


def prepare(config: Any, cache: pathlib.Path) -> dict[str, pathlib.Path]:
  """Builds (or finds in the cache) the dictd task files of `config.dictd` and points
  data.adapt / valid / test / pool / oracle at them (data.format chat, data.pool_format text).
  Returns the paths."""
  spec = Spec.from_config(config.dictd)
  folder = cache / "dictd" / f"task-{spec.key()}"
  paths = {name: folder / f"{name}.jsonl" for name in SPLITS}
  if not all(p.is_file() for p in paths.values()):
    names = (spec.target, *spec.pool)
    entries = {name: load(cache, name) for name in dict.fromkeys(names)}
    paths = write_task(build_task(entries[spec.target], entries, spec), folder)
  d = config.data
  d.adapt, d.valid, d.test = str(paths["adapt"]), str(paths["valid"]), str(paths["test"])
  d.pool, d.oracle = str(paths["pool"]), str(paths["oracle"])
  d.format, d.pool_format = "chat", "text"
  return paths
