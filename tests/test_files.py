"""jbat.data.files: reading JSONL / JSONL.gz / Parquet / text folders, streaming, sharding."""

import gzip
import json
import pathlib

import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from jbat.data import files  # noqa: E402
from jbat.errors import JbatError  # noqa: E402


def write_jsonl(path: pathlib.Path, rows, gz=False, blank_every=0):
  lines = []
  for i, r in enumerate(rows):
    lines.append(json.dumps(r))
    if blank_every and i % blank_every == 0:
      lines.append("   ")
  data = ("\n".join(lines) + "\n").encode() if rows else b""
  path.write_bytes(gzip.compress(data) if gz else data)
  return path


def write_parquet(path: pathlib.Path, rows):
  pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=3)
  return path


def make_pool(tmp_path):
  """3 JSONL.gz files + 1 Parquet file (+ 1 empty JSONL.gz), 29 rows in all."""
  d = tmp_path / "pool"
  d.mkdir()
  n = 0
  for i, size in enumerate([7, 5, 9]):
    write_jsonl(d / f"part{i}.jsonl.gz",
                [{"text": f"doc {n + j}", "extra": j} for j in range(size)], gz=True,
                blank_every=3)
    n += size
  write_jsonl(d / "part3.jsonl.gz", [], gz=True)  # An empty shard among non-empty ones.
  write_parquet(d / "more.parquet", [{"text": f"doc {n + j}", "other": 1.0} for j in range(8)])
  return d, n + 8


def texts(records):
  return [r.fields["text"] for r in records]


def test_reads_every_kind_in_order_with_stable_ids(tmp_path):
  d, total = make_pool(tmp_path)
  reader = files.RecordReader(f"{d}/*.jsonl.gz,{d}/more.parquet")
  recs = list(reader)
  assert len(recs) == total and len(set(texts(recs))) == total
  assert [r.file for r in recs][:1] == [f"{d}/part0.jsonl.gz"]
  assert texts(recs)[:3] == ["doc 0", "doc 1", "doc 2"]  # Blank lines skipped.
  assert recs[1].line == 3 and recs[1].row == 1 and recs[1].where == f"{d}/part0.jsonl.gz, line 3"
  assert recs[-1].uid == f"{d}/more.parquet:7" and recs[-1].id == files.stable_id(recs[-1].uid)
  assert set(recs[-1].fields) == {"text"}  # Parquet: only the needed columns are read.
  assert reader.empty_files == [f"{d}/part3.jsonl.gz"]
  assert [r.id for r in files.RecordReader(f"{d}/*.jsonl.gz,{d}/more.parquet")] == \
      [r.id for r in recs]
  assert len({r.id for r in recs}) == total


def test_text_folder_and_id_field(tmp_path):
  folder = tmp_path / "texts"
  (folder / "sub").mkdir(parents=True)
  (folder / "b.txt").write_text("bee")
  (folder / "sub" / "a.txt").write_text("ay")
  (folder / "skip.md").write_text("not a text file")
  recs = files.read_all(str(folder), text_field="body")
  assert [r.fields for r in recs] == [{"body": "bee"}, {"body": "ay"}]
  assert [r.uid for r in recs] == [f"{folder}:0", f"{folder}:1"]
  path = write_jsonl(tmp_path / "ids.jsonl", [{"text": "x", "key": 41}, {"text": "y", "key": "q7"}])
  recs = files.read_all(str(path), id_field="key")
  assert [(r.uid, r.id) for r in recs] == [("41", 41), ("q7", files.stable_id("q7"))]
  bad = write_jsonl(tmp_path / "badid.jsonl", [{"text": "x"}])
  with pytest.raises(JbatError, match=r"badid.jsonl, line 1: id field 'key'"):
    files.read_all(str(bad), id_field="key")


@pytest.mark.parametrize("shards", [2, 3, 5, 7])
def test_shards_read_every_row_exactly_once(tmp_path, shards):
  """4 non-empty files: 2 and 3 processes shard by file, 5 and 7 by row ranges."""
  d, total = make_pool(tmp_path)
  spec = f"{d}/*.jsonl.gz,{d}/*.parquet"
  whole = {r.uid: r.fields["text"] for r in files.RecordReader(spec)}
  seen = []
  for i in range(shards):
    reader = files.RecordReader(spec, shard_index=i, shard_count=shards)
    assert all(s.stop is None for s in reader.spans) == (shards <= 4)
    part = [(r.uid, r.fields["text"]) for r in reader]
    assert part == [(r.uid, r.fields["text"]) for r in
                    files.RecordReader(spec, shard_index=i, shard_count=shards)]  # Deterministic.
    seen += part
  assert len(seen) == total and dict(seen) == whole


def test_chunks_stream(tmp_path):
  """Chunks come before the whole file is read: a bad line at the end fails only when reached."""
  rows = [{"text": f"t{i}"} for i in range(10)]
  path = write_jsonl(tmp_path / "a.jsonl", rows)
  with open(path, "a") as f:
    f.write("{not json\n")
  it = files.RecordReader(str(path)).chunks(4)
  assert texts(next(it)) == ["t0", "t1", "t2", "t3"]
  assert texts(next(it)) == ["t4", "t5", "t6", "t7"]
  with pytest.raises(JbatError, match=r"a.jsonl, line 11: not valid JSON"):
    next(it)
  ok = write_jsonl(tmp_path / "b.jsonl", rows)
  assert [len(c) for c in files.RecordReader(str(ok)).chunks(4)] == [4, 4, 2]


def test_errors_name_key_file_and_field(tmp_path):
  with pytest.raises(JbatError, match=r"data.pool: '.*nothing\*.jsonl' matches no file"):
    files.RecordReader(f"{tmp_path}/nothing*.jsonl")
  with pytest.raises(JbatError, match=r"data.valid: .*missing.jsonl' does not exist"):
    files.resolve(f"{tmp_path}/missing.jsonl", "data.valid")
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(JbatError, match=r"x.csv: unsupported file type"):
    files.resolve(str(tmp_path / "x.csv"))
  pq_path = write_parquet(tmp_path / "p.parquet", [{"body": "a"}])
  with pytest.raises(JbatError, match=r"p.parquet: Parquet file has no column 'text'"):
    list(files.RecordReader(str(pq_path)))
  write_jsonl(tmp_path / "e1.jsonl", [])
  write_jsonl(tmp_path / "e2.jsonl.gz", [], gz=True)
  with pytest.raises(JbatError, match=r"every file is empty"):
    files.RecordReader(f"{tmp_path}/e*")
  (tmp_path / "arr.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
  with pytest.raises(JbatError, match=r"arr.jsonl, line 2: expected a JSON object"):
    list(files.RecordReader(str(tmp_path / "arr.jsonl")))
