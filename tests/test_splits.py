"""jbat.data.splits: the task's adapt/valid/test splits from files or counts; the own-data keys."""

import json

import pytest

from jbat import config as config_lib
from jbat.data import splits
from jbat.errors import JbatError


def write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def own_config(tmp_path, **data):
  c = config_lib.base_config()
  c.data.format = "prompt_response"
  c.data.adapt = write(tmp_path / "adapt.jsonl",
                       [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)])
  for k, v in data.items():
    c.data[k] = v
  return c


def test_parse_split():
  assert splits.parse_split("", "data.valid") is None
  assert splits.parse_split(" 12 ", "data.valid") == 12
  assert splits.parse_split("v.jsonl,w/*.parquet", "data.valid") == "v.jsonl,w/*.parquet"
  with pytest.raises(JbatError, match=r"config: data.test must be files or a count >= 1"):
    splits.parse_split("0", "data.test")


def test_counts_split_off_adapt_deterministically(tmp_path):
  c = own_config(tmp_path, valid="3", test="2")
  task = splits.load_task(c.data, seed=5)
  assert (len(task.adapt), len(task.valid), len(task.test)) == (5, 3, 2)
  prompts = [r.fields["prompt"] for r in task.adapt + task.valid + task.test]
  assert sorted(prompts) == sorted(f"q{i}" for i in range(10))
  assert [r.row for r in task.adapt] == sorted(r.row for r in task.adapt)  # Input order.
  again = splits.load_task(c.data, seed=5)
  assert [r.uid for r in again.valid] == [r.uid for r in task.valid]
  other = splits.load_task(c.data, seed=6)
  assert {r.uid for r in other.test} != {r.uid for r in task.test} or \
      {r.uid for r in other.valid} != {r.uid for r in task.valid}
  with pytest.raises(JbatError, match=r"data.adapt has 10 examples: too few"):
    splits.load_task(own_config(tmp_path, valid="6", test="4").data, seed=0)


def test_split_files_and_overlap(tmp_path):
  valid = write(tmp_path / "valid.jsonl", [{"prompt": "vq", "response": "va"}])
  test = write(tmp_path / "test.jsonl", [{"prompt": "tq", "response": "ta"},
                                         {"prompt": "q3 ", "response": "a3"}])
  c = own_config(tmp_path, valid=valid, test="2")
  task = splits.load_task(c.data, seed=0)
  assert (len(task.adapt), len(task.valid), len(task.test)) == (8, 1, 2)
  c = own_config(tmp_path, valid=valid, test=test)
  with pytest.raises(JbatError, match=r"data.test overlaps data.adapt: .*test.jsonl, line 2 has "
                                      r"the same text as .*adapt.jsonl, line 4"):
    splits.load_task(c.data, seed=0)


def test_pool_reader_uses_pool_format_fields(tmp_path):
  c = own_config(tmp_path, pool=write(tmp_path / "pool.jsonl", [{"body": "x"}, {"body": "y"}]))
  c.data.text_field = "body"
  assert [r.fields["body"] for r in splits.pool_reader(c.data, 1, 2)] == ["y"]


def test_config_keys_default_to_today_and_are_validated(tmp_path):
  base = config_lib.base_config()
  assert (base.data.adapt, base.data.pool, base.data.format, base.data.pool_format) == \
      ("", "", "text", "text")
  config_lib.validate(base)
  config_lib.validate(own_config(tmp_path, valid="2", pool=str(tmp_path / "*.jsonl")))
  cases = [
      (dict(format="csv"), r"config: data.format must be one of text, prompt_response, chat"),
      (dict(pool_format="x"), r"config: data.pool_format must be one of"),
      (dict(pool=f"{tmp_path}/none*.parquet"), r"config: data.pool: '.*none\*.parquet' matches "
                                               r"no file"),
      (dict(valid="-1"), r"config: data.valid must be files or a count >= 1"),
      (dict(test=str(tmp_path / "t.jsonl")), r"config: data.test: '.*t.jsonl' does not exist"),
      (dict(adapt="", valid="3"), r"config: data.valid is set but data.adapt is empty"),
      (dict(prompt_field=""), r"config: data.prompt_field must not be empty"),
  ]
  for data, msg in cases:
    with pytest.raises(JbatError, match=msg):
      config_lib.validate(own_config(tmp_path, **data))


def test_pool_chunks_on_two_processes_equal_one(tmp_path):
  """A pool of 3 JSONL.gz + 1 Parquet (+ an empty shard): 2 processes encode every row exactly
  once, the same examples as 1 process; responses cut by max_len are dropped with their record."""
  from tests.test_files import write_jsonl, write_parquet
  from tests.test_formats import make_tokenizer
  rows = [{"prompt": " ".join(f"w{9 + (i + j) % 30}" for j in range(1 + i % 5)),
           "response": f"w{10 + i % 29}"} for i in range(26)]
  for i, part in enumerate([rows[:6], rows[6:10], rows[10:18]]):
    write_jsonl(tmp_path / f"p{i}.jsonl.gz", part, gz=True)
  write_jsonl(tmp_path / "p3.jsonl.gz", [], gz=True)
  write_parquet(tmp_path / "q.parquet", rows[18:])
  c = config_lib.base_config()
  c.data.pool, c.data.pool_format = f"{tmp_path}/p*.jsonl.gz,{tmp_path}/q.parquet", \
      "prompt_response"
  tok = make_tokenizer()

  def run(shards):
    out, cut, empty_files = {}, 0, set()
    for i in range(shards):
      reader = splits.pool_reader(c.data, i, shards)
      empty_files.update(reader.empty_files)
      for records, examples, stats in splits.pool_chunks(reader, c.data, tok, 4, 3):
        assert [r.id for r in records] == [e["id"] for e in examples]
        cut += stats.cut
        for r, e in zip(records, examples):
          assert r.id not in out
          out[r.id] = (r.uid, e["ids"].tolist(), e["weights"].tolist())
    return out, cut, empty_files

  one, cut1, empty1 = run(1)
  two, cut2, _ = run(2)
  assert one == two and cut1 == cut2 and len(one) + cut1 == 26
  # No bos here: ids = prompt + response, 5 ids kept; a 5-word prompt leaves no response.
  assert cut1 == sum(1 for r in rows if len(r["prompt"].split()) == 5) > 0
  assert empty1 == {f"{tmp_path}/p3.jsonl.gz"}
