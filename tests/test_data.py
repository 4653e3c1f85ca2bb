"""Tests for jbat.data: sources, task split, tokenizer, and the grain batch pipeline."""

import json
import os
import shutil

import numpy as np
import pytest

from jbat.data import pipeline, sources, tokenizer
from jbat.data.sources import Document
from jbat.errors import JbatError

# ----------------------------------------------------------------------------- sources


def _fake_fortunes(root):
  d = root / "fortunes"
  d.mkdir()
  (d / "alpha").write_text("first one\n%\n  second\n  line two  \n%\n%\n\nthird\n%\n")
  (d / "beta").write_text("only beta\n")
  (d / "gamma").write_bytes(b"g1 \xff bad byte\n%\ng2\n")
  (d / "alpha.dat").write_bytes(b"\x00\x01binary index")
  os.symlink("alpha", d / "alpha.u8")
  (d / "sub").mkdir()
  (d / "sub" / "nested").write_text("not a category\n")
  return d


def test_load_fortunes_parses_categories_ids_and_labels(tmp_path):
  docs = sources.load_fortunes(_fake_fortunes(tmp_path))
  assert [(d.id, d.label, d.text) for d in docs] == [
      (0, "alpha", "first one"),
      (1, "alpha", "second\n  line two"),
      (2, "alpha", "third"),
      (3, "beta", "only beta"),
      (4, "gamma", "g1 \ufffd bad byte"),
      (5, "gamma", "g2"),
  ]
  assert all(d.source == "fortunes" for d in docs)


def test_load_fortunes_missing_dir(tmp_path):
  with pytest.raises(JbatError, match="does not exist"):
    sources.load_fortunes(tmp_path / "nope")


def test_load_jsonl_ok_and_errors(tmp_path):
  p = tmp_path / "data.jsonl"
  p.write_text('{"text": "a", "cat": "x", "k": 7}\n\n{"text": "b", "k": 3}\n')
  docs = sources.load_jsonl(p, label_field="cat", id_field="k")
  assert docs == [Document(7, "a", "data.jsonl", "x"), Document(3, "b", "data.jsonl", None)]
  assert [d.id for d in sources.load_jsonl(p)] == [0, 1]

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "a"}\n\n{"text": oops}\n')
  with pytest.raises(JbatError, match=r"bad\.jsonl, line 3.*not valid JSON"):
    sources.load_jsonl(bad)

  missing = tmp_path / "missing.jsonl"
  missing.write_text('{"text": "a"}\n{"body": "b"}\n')
  with pytest.raises(JbatError, match=r"missing\.jsonl, line 2.*'text' is missing"):
    sources.load_jsonl(missing)
  with pytest.raises(JbatError, match=r"line 1.*'body' is missing"):
    sources.load_jsonl(missing, text_field="body")

  nonstr = tmp_path / "nonstr.jsonl"
  nonstr.write_text('{"text": 5}\n')
  with pytest.raises(JbatError, match=r"nonstr\.jsonl, line 1.*'text' is a int"):
    sources.load_jsonl(nonstr)


def test_load_text_folder(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "a" / "deep").mkdir(parents=True)
  (tmp_path / "root.txt").write_text("r")
  (tmp_path / "b" / "x.txt").write_text("bx")
  (tmp_path / "a" / "y.txt").write_text("ay")
  (tmp_path / "a" / "deep" / "z.txt").write_text("adz")
  (tmp_path / "a" / "ignored.md").write_text("no")
  docs = sources.load_text_folder(tmp_path)
  assert [(d.id, d.text, d.label, d.source) for d in docs] == [
      (0, "adz", "a/deep", "a/deep/z.txt"),
      (1, "ay", "a", "a/y.txt"),
      (2, "bx", "b", "b/x.txt"),
      (3, "r", None, "root.txt"),
  ]
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(JbatError, match="no \\*.txt"):
    sources.load_text_folder(empty)
  with pytest.raises(JbatError, match="does not exist"):
    sources.load_text_folder(tmp_path / "missing")


def test_dedup_keeps_lowest_id_by_normalised_text():
  docs = [
      Document(5, "hello   world", "s"),
      Document(2, " hello\nworld ", "s"),
      Document(3, "other", "s"),
      Document(9, "Hello world", "s"),  # case differs: not a duplicate
  ]
  out = sources.dedup(docs)
  assert [d.id for d in out] == [2, 3, 9]
  assert sources.text_hash("a  b\n") == sources.text_hash("a b")
  assert sources.text_hash("a b") != sources.text_hash("ab")


def _labelled(n_per, labels=("x", "y", "z")):
  docs = []
  for lab in labels:
    for i in range(n_per):
      docs.append(Document(len(docs), f"{lab} doc {i}", "t", lab))
  return docs


def test_make_task_split_is_disjoint_complete_and_seeded():
  docs = _labelled(10) + [Document(30, "x doc 0", "t", "x")]  # a duplicate, dropped
  task = sources.make_task(docs, "y", n_adapt=3, n_heldout=4, seed=1)
  ids = lambda ds: [d.id for d in ds]
  assert len(task.adapt) == 3 and len(task.heldout) == 4
  assert all(d.label == "y" for d in task.adapt + task.heldout)
  a, h, p = set(ids(task.adapt)), set(ids(task.heldout)), set(ids(task.pool))
  assert not (a & h) and not (a & p) and not (h & p)
  assert a | h | p == set(range(30))
  assert ids(task.pool) == sorted(ids(task.pool))
  again = sources.make_task(docs, "y", 3, 4, seed=1)
  assert again == task
  other = sources.make_task(docs, "y", 3, 4, seed=2)
  assert ids(other.adapt) + ids(other.heldout) != ids(task.adapt) + ids(task.heldout)
  # the split follows numpy's permutation of the domain's docs in id order
  perm = np.random.default_rng(1).permutation(10)
  assert ids(task.adapt) == [10 + int(i) for i in perm[:3]]


def test_make_task_errors():
  docs = _labelled(5)
  with pytest.raises(JbatError, match="'w' not found; available domains: x, y, z"):
    sources.make_task(docs, "w", 1, 1, 0)
  with pytest.raises(JbatError, match="empty adaptation set"):
    sources.make_task(docs, "x", 0, 1, 0)
  with pytest.raises(JbatError, match="has 5 documents"):
    sources.make_task(docs, "x", 3, 3, 0)


def _have_apt():
  return shutil.which("apt-get") is not None and shutil.which("dpkg") is not None


@pytest.mark.network
@pytest.mark.skipif(not _have_apt(), reason="apt-get/dpkg not available to fetch fortunes")
def test_real_fortunes(tmp_path):
  try:
    d = sources.fortunes_dir(tmp_path)
  except JbatError as e:
    pytest.skip(f"cannot fetch the fortunes packages (offline?): {e}")
  docs = sources.load_fortunes(d)
  assert len({doc.label for doc in docs}) == 43
  assert len(docs) > 10_000
  assert [doc.id for doc in docs] == list(range(len(docs)))
  if d != sources.SYSTEM_FORTUNES:
    assert d == tmp_path / "fortunes"
    assert sorted(os.listdir(tmp_path)) == ["fortunes"]  # no temp leftovers
    assert sources.fortunes_dir(tmp_path) == d  # cached


# ----------------------------------------------------------------------------- tokenizer

_TEXTS = [f"the quick brown fox {i} jumps over the lazy dog, {i % 7} times!" for i in range(60)]
_TEXTS += ["Ünïcödé – ok? «quotes» 日本語\n\ttabs", "a , b . c ! don 't  x"]


def test_tokenizer_deterministic_and_round_trips(tmp_path):
  a = tokenizer.train_bpe_tokenizer(_TEXTS, 320, tmp_path / "a" / "tokenizer.json")
  tokenizer.train_bpe_tokenizer(_TEXTS, 320, tmp_path / "b.json")
  assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b.json").read_bytes()
  assert [a.convert_tokens_to_ids(t) for t in tokenizer.SPECIAL_TOKENS] == [0, 1, 2]
  assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)
  assert 259 < len(a) <= 320  # stops early when no pair occurs twice
  for text in _TEXTS + ["never seen: ¿qué? 🙂"]:
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text
  loaded = tokenizer.load_tokenizer(tmp_path / "a")  # folder holding tokenizer.json
  assert loaded(_TEXTS[0])["input_ids"] == a(_TEXTS[0])["input_ids"]
  with pytest.raises(JbatError, match="no tokenizer"):
    tokenizer.load_tokenizer(tmp_path / "missing")


def test_get_or_train_tokenizer_caches(tmp_path):
  t1 = tokenizer.get_or_train_tokenizer(iter(_TEXTS), 300, tmp_path)
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 1 and files[0].startswith("tokenizer-")
  mtime = os.path.getmtime(tmp_path / files[0])
  t2 = tokenizer.get_or_train_tokenizer(_TEXTS, 300, tmp_path)
  assert os.path.getmtime(tmp_path / files[0]) == mtime
  assert t1(_TEXTS[-1])["input_ids"] == t2(_TEXTS[-1])["input_ids"]
  tokenizer.get_or_train_tokenizer(_TEXTS, 301, tmp_path)
  assert len(os.listdir(tmp_path)) == 2


# ----------------------------------------------------------------------------- pipeline


class _CharTok:
  """Minimal tokenizer stand-in: one token per character (ord % 50 + 3), bos 1, eos 2."""

  bos_token_id, eos_token_id = 1, 2

  def __call__(self, texts, add_special_tokens=False):
    return {"input_ids": [[ord(c) % 50 + 3 for c in t] for t in texts]}


def test_encode_frames_and_truncates(tmp_path):
  docs = [Document(4, "ab", "s"), Document(9, "abcdefgh", "s")]
  ex = pipeline.encode(docs, _CharTok(), max_len=5)
  assert ex[0]["id"] == 4 and ex[0]["ids"].tolist() == [1, ord("a") % 50 + 3, ord("b") % 50 + 3, 2]
  assert ex[0]["ids"].dtype == np.int32
  assert ex[1]["ids"].tolist() == [1] + [ord(c) % 50 + 3 for c in "abcde"]  # L+1 tokens
  tok = tokenizer.train_bpe_tokenizer(_TEXTS, 300, tmp_path / "tok.json")
  real = pipeline.encode([Document(0, _TEXTS[0], "s")], tok, 1000)[0]["ids"]
  assert real[0] == tok.bos_token_id and real[-1] == tok.eos_token_id
  assert tok.decode(real[1:-1]) == _TEXTS[0]


def _ex(i, n):
  """Example with id i and n ids: [100*i + 0, ..., 100*i + n-1] (distinct per document)."""
  return {"id": i, "ids": np.arange(100 * i, 100 * i + n, dtype=np.int32)}


def test_pad_batch_by_hand():
  b = pipeline.pad_batch([_ex(1, 4), _ex(2, 7)], batch_size=3, max_len=5, pad_id=0)
  assert b["tokens"].tolist() == [
      [100, 101, 102, 0, 0],
      [200, 201, 202, 203, 204],
      [0, 0, 0, 0, 0],
  ]
  assert b["targets"].tolist() == [
      [101, 102, 103, 0, 0],
      [201, 202, 203, 204, 205],
      [0, 0, 0, 0, 0],
  ]
  assert b["weights"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [0] * 5]
  assert b["segment_ids"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [0] * 5]
  assert b["positions"][:2].tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]
  assert b["id"].tolist() == [1, 2, -1] and b["valid"].tolist() == [True, True, False]
  dtypes = {k: v.dtype for k, v in b.items()}
  assert dtypes == {
      "tokens": np.int32, "targets": np.int32, "weights": np.float32, "positions": np.int32,
      "segment_ids": np.int32, "id": np.int64, "valid": np.bool_,
  }
  with pytest.raises(JbatError):
    pipeline.pad_batch([_ex(1, 3)] * 4, 3, 5, 0)


def _check_packed(b, examples, max_len):
  """Every target is the next id of the same document; each doc appears once, contiguously."""
  seen = []
  for i in range(b["tokens"].shape[0]):
    seg = b["segment_ids"][i]
    assert ((seg > 0) == (b["weights"][i] > 0)).all()
    for k in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == k)
      assert (np.diff(where) == 1).all()  # contiguous
      toks, tgts = b["tokens"][i, where], b["targets"][i, where]
      doc = toks[0] // 100
      assert (tgts == toks + 1).all() and (tgts // 100 == doc).all()  # never crosses a doc
      assert b["positions"][i, where].tolist() == list(range(len(where)))
      ids = examples[doc]["ids"][: max_len + 1]
      assert toks.tolist() == ids[:-1].tolist() and tgts[-1] == ids[-1]
      seen.append(int(doc))
  return seen


def test_pack_batch_segments():
  examples = {i: _ex(i, n) for i, n in [(1, 4), (2, 3), (3, 6), (4, 2), (5, 5)]}
  order = [1, 2, 3, 4, 5]
  b = pipeline.pack_batch([examples[i] for i in order], batch_size=3, max_len=6, pad_id=0)
  # next-fit: row0 = docs 1 (3 pairs) + 2 (2 pairs); row1 = doc 3 (5) + 4 (1); row2 = doc 5 (4)
  assert b["segment_ids"].tolist() == [
      [1, 1, 1, 2, 2, 0],
      [1, 1, 1, 1, 1, 2],
      [1, 1, 1, 1, 0, 0],
  ]
  assert b["positions"][0].tolist() == [0, 1, 2, 0, 1, 0]
  assert b["tokens"][0].tolist() == [100, 101, 102, 200, 201, 0]
  assert b["targets"][0].tolist() == [101, 102, 103, 201, 202, 0]
  assert b["id"].tolist() == [1, 3, 5] and b["valid"].all()
  assert _check_packed(b, examples, 6) == order
  with pytest.raises(JbatError, match="do not fit"):
    pipeline.pack_batch([examples[3]] * 4, batch_size=3, max_len=6, pad_id=0)


def _dataset(n=23, seed=0):
  rng = np.random.default_rng(seed)
  return [_ex(i, int(rng.integers(2, 9))) for i in range(n)]


def _take(it, k):
  return [next(it) for _ in range(k)]


def _same(bs1, bs2):
  assert len(bs1) == len(bs2)
  for a, b in zip(bs1, bs2):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("pack", [False, True])
def test_train_loader_deterministic_and_resumable(pack):
  data = _dataset()
  mk = lambda seed=3: pipeline.train_loader(data, 4, 6, 0, seed, pack=pack)
  first = _take(mk(), 12)
  _same(first, _take(mk(), 12))
  other = _take(mk(seed=4), 12)
  assert any((a["tokens"] != b["tokens"]).any() for a, b in zip(first, other))

  it = mk()
  _take(it, 5)
  state = pipeline.state_from_json(pipeline.state_to_json(it.get_state()))
  assert json.loads(json.dumps(it.get_state())) == it.get_state()
  resumed = mk()
  resumed.set_state(state)
  _same(_take(resumed, 7), first[5:])
  if pack:
    for b in first:
      _check_packed(b, {e["id"]: e for e in data}, 6)


def test_train_loader_epochs_reshuffle_and_cover():
  data = _dataset(12)
  it = pipeline.train_loader(data, 4, 8, 0, seed=0)
  ids = np.concatenate([b["id"] for b in _take(it, 6)])  # 2 epochs
  assert sorted(ids[:12].tolist()) == list(range(12))
  assert sorted(ids[12:].tolist()) == list(range(12))
  assert ids[:12].tolist() != ids[12:].tolist()


def _row_docs(b, i):
  """Document ids (from the token values, see `_ex`) of the segments of row i, in order."""
  seg = b["segment_ids"][i]
  return [int(b["tokens"][i][seg == k][0]) // 100 for k in range(1, seg.max() + 1)]


@pytest.mark.parametrize("pack", [False, True])
def test_train_loader_shards_partition_one_epoch(pack):
  data = _dataset(23)
  n = 3
  seen = []
  for s in range(n):
    size = len(range(s, 23, n))
    it = pipeline.train_loader(data, 1, 8, 0, seed=5, shard_index=s, shard_count=n, pack=pack)
    ids = []
    while len(ids) < size:  # one epoch of this shard
      b = next(it)
      ids += _row_docs(b, 0) if pack else b["id"].tolist()
    ids = ids[:size]  # a packed row may run into the next epoch
    assert len(set(ids)) == size
    seen.append(set(ids))
  assert sum(len(s) for s in seen) == 23
  assert set().union(*seen) == set(range(23))
  with pytest.raises(JbatError, match="bad shard"):
    pipeline.train_loader(data, 1, 8, 0, 0, shard_index=3, shard_count=3)


def test_eval_batches_cover_once_with_invalid_padding():
  data = _dataset(11)
  all_ids = []
  for s in range(2):
    batches = list(pipeline.eval_batches(data, 4, 8, 0, shard_index=s, shard_count=2))
    assert len(batches) == pipeline.num_eval_batches(11, 4, 2) == 2
    for b in batches:
      assert b["tokens"].shape == (4, 8)
      assert (b["id"][~b["valid"]] == -1).all()
      assert (b["weights"][~b["valid"]] == 0).all()
    ids = np.concatenate([b["id"][b["valid"]] for b in batches]).tolist()
    assert ids == list(range(s, 11, 2))  # ordered
    all_ids += ids
  assert sorted(all_ids) == list(range(11))
  single = list(pipeline.eval_batches(data, 4, 8, 0))
  assert len(single) == 3 and single[-1]["valid"].tolist() == [True, True, True, False]
