"""The dictd task: dictd's base64 and index format, entry cleaning, the seeded split, the pool's
deduplication against the held-out terms, and `prepare` writing the own-path files, all on tiny
fake dictionaries written by the test."""

import gzip
import json
import pathlib

import pytest

from jbat import config as config_lib
from jbat.data import dictd, files, splits
from jbat.errors import JbatError


def write_dictionary(folder: pathlib.Path, name: str, entries: list[tuple[list[str], str]]):
  """<folder>/<name>.index + .dict.dz: each entry's text once, under one or more headwords, and
  a 00-database-short metadata entry."""
  folder.mkdir(parents=True, exist_ok=True)
  blob, lines = b"", []
  for heads, text in [(["00-database-short"], f"{name} test dictionary\n"), *entries]:
    data = text.encode("utf-8")
    for h in heads:
      lines.append(f"{h}\t{dictd.encode_b64(len(blob))}\t{dictd.encode_b64(len(data))}")
    blob += data
  (folder / f"{name}.index").write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
  with gzip.open(folder / f"{name}.dict.dz", "wb") as f:
    f.write(blob)


def jargon_entry(i: int) -> tuple[list[str], str]:
  return [f"term{i:02d}"], (f"term{i:02d}\n /term/, n.\n\n    1. The {{thing}} number {i}, "
                            f"used by hackers\n    jokingly. Not to be confused with term{i + 1}.\n")


def other_entries(n: int, prefix: str) -> list[tuple[list[str], str]]:
  out = [([f"{prefix}{i}"], f"{prefix.upper()}{i}, n.  A {prefix} word number {i} of the pool.\n")
         for i in range(n)]
  return out


def test_base64_round_trip_and_known_values():
  assert dictd.decode_b64("A") == 0 and dictd.decode_b64("B") == 1
  assert dictd.decode_b64("BA") == 64 and dictd.decode_b64("/") == 63
  for n in (0, 1, 63, 64, 4095, 4096, 123456789):
    assert dictd.decode_b64(dictd.encode_b64(n)) == n
  with pytest.raises(ValueError):
    dictd.decode_b64("A=")


def test_read_dictionary_one_entry_per_text(tmp_path):
  write_dictionary(tmp_path, "jargon", [(["zork", "Zork!"], "ZORK\n n. a game.\n"),
                                        (["abc"], "abc\n n. letters.\n")])
  entries = dictd.read_dictionary(tmp_path / "jargon.index", tmp_path / "jargon.dict.dz")
  # Sorted index: "Zork!" < "abc" < "zork"; the metadata entry is dropped; the shared text once.
  assert [e.headword for e in entries] == ["Zork!", "abc"]
  assert entries[1].text == "abc\n n. letters.\n"
  (tmp_path / "bad.index").write_text("word\tnot base64!\tB\n")
  with pytest.raises(JbatError, match="bad.index, line 1"):
    dictd.read_index(tmp_path / "bad.index")


def test_definition_cleaning():
  e = dictd.Entry("abend", "ABEND\n /a´bend/, n.\n\n    [ABnormal END] See {crash};\n"
                  "    {lossage}.\n")
  assert dictd.definition(e, 400) == "/a´bend/, n. [ABnormal END] See crash; lossage."
  devil = dictd.Entry("academe", "ACADEME, n.  An ancient school where morality and\n"
                      "philosophy were taught.\n")
  assert dictd.definition(devil, 400) == ("n. An ancient school where morality and philosophy "
                                          "were taught.")
  long = dictd.Entry("x", "x\nOne two three. Four five six seven eight. Nine ten eleven.\n")
  assert dictd.definition(long, 45) == "One two three. Four five six seven eight."
  assert dictd.definition(long, 12) == "One two"  # No sentence end in the second half: a space.


def read(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_prepare_split_pool_and_oracle(tmp_path, monkeypatch):
  monkeypatch.setattr(dictd.sources, "fetch_debian_folder",
                      lambda *a, **k: pytest.fail("must not fetch: the cache has the files"))
  c, paths = build_cache(tmp_path)  # Fake dictionaries in the cache layout <cache>/dictd/<name>/.
  rows = {k: read(p) for k, p in paths.items()}
  assert [len(rows[k]) for k in ("adapt", "valid", "test", "oracle")] == [8, 6, 10, 12]
  terms = {k: [r["term"] for r in rows[k]] for k in ("adapt", "valid", "test", "oracle")}
  every = sum(terms.values(), [])
  assert len(set(every)) == len(every)  # The four target splits are disjoint.
  held = set(terms["valid"]) | set(terms["test"])
  pool_terms = [r["term"] for r in rows["pool"]]
  assert not held & set(pool_terms)
  # Every pool entry whose headword is not held out is there (35 others + term00/01 if not held).
  assert len(pool_terms) == 35 + len({"term00", "term01"} - held)
  assert {r["source"] for r in rows["pool"]} == {"foldoc", "devil"}
  r = rows["test"][0]
  assert r["messages"][0]["content"] == f"What does {r['term']} mean?"
  assert r["messages"][1]["content"].startswith("/term/, n. 1. The thing number")
  assert rows["oracle"][0]["text"].startswith(rows["oracle"][0]["term"] + ": /term/")
  # The config now points at the files, as own-path data.
  assert c.data.adapt == str(paths["adapt"]) and c.data.format == "chat"
  assert c.data.pool_format == "text" and c.data.oracle == str(paths["oracle"])
  task = splits.load_task(c.data, 0)
  assert len(task.adapt) == 8 and len(task.test) == 10
  assert len(files.read_all(c.data.pool, what="data.pool")) == len(pool_terms)
  # Same settings, same files (cached); another seed, another split.
  _, again = build_cache(tmp_path)
  assert again == paths and read(again["test"]) == rows["test"]
  _, other = build_cache(tmp_path, seed=1)
  assert [r["term"] for r in read(other["test"])] != terms["test"]


def build_cache(tmp_path, **kw):
  cache = tmp_path / "cache"
  write_dictionary(cache / "dictd" / "jargon", "jargon", [jargon_entry(i) for i in range(40)])
  pool = other_entries(30, "foo") + [
      (["term00"], "term00\nA foldoc view of term 0, long enough to be kept.\n"),
      (["term01"], "term01\nA foldoc view of term 1, long enough to be kept.\n")]
  write_dictionary(cache / "dictd" / "foldoc", "foldoc", pool)
  write_dictionary(cache / "dictd" / "devil", "devil", other_entries(5, "bar"))
  c = config_lib.base_config()
  c.data.task = "dictd"
  c.dictd.pool = "foldoc,devil"
  c.dictd.n_adapt, c.dictd.n_valid, c.dictd.n_test, c.dictd.n_oracle = 8, 6, 10, 12
  for k, v in kw.items():
    c.dictd[k] = v
  return c, dictd.prepare(c, cache)


def test_pool_sample_and_errors(tmp_path):
  c, paths = build_cache(tmp_path, n_pool=7)
  assert len(read(paths["pool"])) == 7
  with pytest.raises(JbatError, match="usable entries"):
    build_cache(tmp_path / "b", n_oracle=100)


def test_config_checks():
  c = config_lib.base_config()
  c.data.task = "dictd"
  c.data.adapt = "x.jsonl"
  with pytest.raises(JbatError, match="leave data.adapt"):
    config_lib.validate_task(c)
  c.data.adapt = ""
  c.dictd.pool = "jargon,foldoc"
  with pytest.raises(JbatError, match="dictd.target"):
    config_lib.validate_task(c)
  c.dictd.pool = "foldoc"
  c.data.task = "other"
  with pytest.raises(JbatError, match="data.task"):
    config_lib.validate_task(c)
