"""A pool given as files is streamed: each process reads its share, the scores merge by id.

The CLI selects (`stop_after=select`, arm albat) from a pool of 3 JSONL.gz files and 1
Parquet file as 1 process and as 2 processes over the same 2-device mesh: every pool row is
read exactly once across the processes (the summed read count, the scored locations) and the
manifests are byte-identical. A unit test checks that the shares partition the rows and that
re-reading by location gives the streamed examples. Near-copies of adaptation texts planted in
the pool leave it as it streams (data.near_dup): the same rows on 1 and 2 processes, and
the re-reads and random draws never return them.
"""

import gzip
import json
import pathlib

import numpy as np
import pytest

from jbat.data import formats, neardup, pool_stream
from tests import synthetic
from tests import test_multiprocess as multiprocess
from tests.test_multiprocess import ROOT

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

MANIFEST = pathlib.Path("select/rel_loss_diff/selection/manifest.jsonl")
N_ROWS = (13, 9, 11, 15)  # 3 JSONL.gz files, then the Parquet file.
# Pool positions (one-process order) holding near-copies of adaptation texts 0, 1, 2.
PLANTED = {5: 0, 20: 1, 40: 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from flax import nnx
  from jbat.data.tokenizer import train_bpe_tokenizer
  from jbat.models.causal_lm import CausalLM, LMConfig
  from jbat.models.hf_io import save_causal_lm
  d = tmp_path_factory.mktemp("poolstream")
  docs = synthetic.documents(30)
  space = [x["text"] for x in docs if x["domain"] == "space"]
  rest = [x["text"] for x in docs if x["domain"] != "space"]
  tok = train_bpe_tokenizer([x["text"] for x in docs], 300, d / "tokenizer.json")
  cfg = LMConfig(vocab_size=len(tok), max_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                 qkv_bias=True)
  save_causal_lm(CausalLM(cfg, rngs=nnx.Rngs(0)), tok, d / "hf")
  (d / "adapt.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in space[:12]))
  pool = space[12:] + rest
  rng = np.random.default_rng(0)
  pool = [pool[i] for i in rng.permutation(len(pool))][:sum(N_ROWS)]
  for pos, j in PLANTED.items():  # Near-duplicates: RT prefix, upper case, a URL.
    pool[pos] = f"RT @fan: {space[j].upper()} http://t.co/{j}"
  lo = 0
  for i, n in enumerate(N_ROWS[:3]):
    with gzip.open(d / f"pool_{i}.jsonl.gz", "wt") as f:
      f.write("".join(json.dumps({"text": t}) + "\n" for t in pool[lo:lo + n]))
    lo += n
  pq.write_table(pa.table({"text": pool[lo:lo + N_ROWS[3]]}), d / "pool_3.parquet")
  return d, tok


def pool_spec(d):
  return f"{d}/pool_*.jsonl.gz,{d / 'pool_3.parquet'}"


def location(pos):
  """(file index, row) of a position in the one-process order."""
  starts = np.cumsum((0,) + N_ROWS)
  f = int(np.searchsorted(starts, pos, side="right") - 1)
  return f, pos - int(starts[f])


def near_dup_locations(d, tok, evaluation):
  """The locations of pool rows that are near-duplicates of `evaluation`, by brute force."""
  pool = pool_stream.FilePool(pool_spec(d), fmt="text", fields=formats.Fields(), id_field="",
                              tokenizer=tok, max_len=32)
  rows = list(pool.local_examples())
  drop = neardup.brute_force([ex["text"] for ex in rows], evaluation)
  return {(ex["file"], ex["row"]) for ex, x in zip(rows, drop) if x}


def test_near_duplicates_leave_the_streamed_pool_alike_in_every_read_path(setup):
  """A FilePool with a near-duplicate index leaves out exactly the brute-force near-duplicates
  of the evaluation texts, counted, whichever shares read it; `read` and `sample` (the
  selection's re-reads, the random arm's draw) never return them; the scores' fingerprint
  names the filter."""
  d, tok = setup
  adapt = [json.loads(line)["text"] for line in (d / "adapt.jsonl").read_text().splitlines()]
  dropped = near_dup_locations(d, tok, adapt)
  assert {location(p) for p in PLANTED} <= dropped  # Far rows may not be near-duplicates.
  assert len(dropped) < sum(N_ROWS) // 2
  kw = dict(fmt="text", fields=formats.Fields(), id_field="", tokenizer=tok, max_len=32)
  plain = pool_stream.FilePool(pool_spec(d), **kw)
  pool = pool_stream.FilePool(pool_spec(d), near_dup=neardup.Index(adapt), **kw)
  everything = {(f, r) for f, n in enumerate(N_ROWS) for r in range(n)}
  for n in (1, 2, 5):
    counts = [pool_stream.PoolCounts() for _ in range(n)]
    locs = [(ex["file"], ex["row"]) for i in range(n)
            for ex in pool.local_examples(i, n, counts[i])]
    assert sorted(locs) == sorted(everything - dropped)
    assert sum(c.near_duplicate for c in counts) == len(dropped)
    assert sum(c.read for c in counts) == sum(N_ROWS)
  kept = sorted(everything - dropped)[:2]
  assert [(ex["file"], ex["row"]) for ex in pool.read(sorted(dropped) + kept)] == kept
  assert len(plain.read(sorted(dropped))) == len(dropped)  # Without the filter: all there.
  drawn = pool.sample(sum(N_ROWS), seed=1)
  assert {(ex["file"], ex["row"]) for ex in drawn} == everything - dropped
  a, b = pool.sample(10, seed=7), pool.sample(10, seed=7)
  assert [x["id"] for x in a] == [x["id"] for x in b]
  assert not {(ex["file"], ex["row"]) for ex in a} & dropped
  assert pool.fingerprint != plain.fingerprint
  assert pool.fingerprint != pool_stream.FilePool(
      pool_spec(d), near_dup=neardup.Index(adapt, threshold=0.8), **kw).fingerprint


def test_shares_partition_the_rows_and_read_by_location(setup):
  d, tok = setup
  pool = pool_stream.FilePool(pool_spec(d), fmt="text", fields=formats.Fields(), id_field="",
                              tokenizer=tok, max_len=32)
  assert [pathlib.Path(f).name for f in pool.files] == [
      "pool_0.jsonl.gz", "pool_1.jsonl.gz", "pool_2.jsonl.gz", "pool_3.parquet"]
  whole = list(pool.local_examples())
  assert len(whole) == sum(N_ROWS)
  for n in (2, 3, 5):  # Whole files (n <= 4 files) or row ranges of every file (n = 5).
    counts = [pool_stream.PoolCounts() for _ in range(n)]
    shares = [[(ex["file"], ex["row"]) for ex in pool.local_examples(i, n, counts[i])]
              for i in range(n)]
    flat = [loc for s in shares for loc in s]
    assert len(flat) == len(set(flat)) == sum(N_ROWS)  # Each row in exactly one share.
    assert sorted(flat) == sorted((ex["file"], ex["row"]) for ex in whole)
    assert sum(c.read for c in counts) == sum(N_ROWS)
  locs = [(3, 4), (0, 12), (1, 0)]
  got = pool.read(locs)
  by_loc = {(ex["file"], ex["row"]): ex for ex in whole}
  assert [(ex["file"], ex["row"]) for ex in got] == locs
  for ex in got:
    assert ex["id"] == by_loc[(ex["file"], ex["row"])]["id"]
    np.testing.assert_array_equal(ex["ids"], by_loc[(ex["file"], ex["row"])]["ids"])
  a, b = pool.sample(10, seed=3), pool.sample(10, seed=3)
  assert [x["id"] for x in a] == [x["id"] for x in b] and len({x["id"] for x in a}) == 10


def launch(d, name, n_proc, devices_per_proc):
  import sys
  workdir = d / name
  args = [sys.executable, "-m", "jbat.train", "--config", str(ROOT / "configs/hf_lora.py"),
          f"--config.model.pretrained={d / 'hf'}", f"--config.data.adapt={d / 'adapt.jsonl'}",
          "--config.data.format=text", "--config.data.valid=4", "--config.data.test=",
          f"--config.data.pool={pool_spec(d)}", "--config.data.max_len=32",
          "--config.surrogate.steps=4", "--config.select.batch_size=4",
          "--config.select.chunk_batches=2", "--config.select.k=12", "--config.select.top_n=24",
          "--config.arms=albat", "--config.stop_after=select", "--config.progress=False",
          f"--config.workdir={workdir}", f"--config.cache_dir={workdir}_cache"]
  return workdir, multiprocess.start_processes(args, workdir, n_proc, devices_per_proc)


def finish(workdir, procs):
  multiprocess.finish(procs, workdir)
  (path,) = pathlib.Path(f"{workdir}_cache").glob("scores/*/cursor.json")
  cursor = json.loads(path.read_text())
  assert cursor["done"]
  from jbat.scoring import stream
  table = stream.load_table(path.parent)
  return (workdir / MANIFEST).read_bytes(), cursor["pool_counts"], table


def test_two_processes_read_each_row_once_and_match_one_process(setup):
  d, tok = setup
  runs = [launch(d, "p1x2", 1, 2), launch(d, "p2x1", 2, 1)]  # At once: 3 processes.
  one, two = (finish(*r) for r in runs)
  # The run's evaluation texts are adapt.jsonl's (adaptation + validation; no test split).
  adapt = [json.loads(line)["text"] for line in (d / "adapt.jsonl").read_text().splitlines()]
  dropped = near_dup_locations(d, tok, adapt)
  assert {location(p) for p in PLANTED} <= dropped
  for manifest, counts, table in (one, two):
    assert counts["read"] == sum(N_ROWS)  # Summed over processes: no row read twice.
    assert counts["near_duplicate"] == len(dropped)  # data.near_dup, dropped as streamed.
    locs = list(zip(table.meta["file"].tolist(), table.meta["row"].tolist()))
    assert len(locs) == len(set(locs)) == counts["kept"]
    assert sorted(locs) == sorted({(f, r) for f, n in enumerate(N_ROWS) for r in range(n)}
                                  - dropped)
  assert one[0] == two[0] and one[0].count(b"\n") == 12
  rows = [json.loads(line) for line in one[0].decode().splitlines()]
  assert all({"id", "uid", "file", "row", "score", "rank", "text"} <= r.keys() for r in rows)
  assert [r["rank"] for r in rows] == list(range(1, 13))
  # The 2-process run scored each process's rows: its table merged by id equals the other's.
  a, b = one[2].sorted_by_id(), two[2].sorted_by_id()
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_allclose(a.scores["rel_loss_diff"], b.scores["rel_loss_diff"], rtol=1e-5)


def test_python_api_select_streams_a_file_pool(setup, tmp_path):
  """jbat.select with the pool given as files takes the streamed path: the selection's rows
  carry file / row / text and its records are the rows read again from those files."""
  import jbat
  d, _ = setup
  sel = jbat.select(str(d / "hf"), None, str(d / "adapt.jsonl"), pool_spec(d), k=5, top_n=10,
                    max_len=32, surrogate_steps=2, batch_size=4, workdir=tmp_path / "w")
  assert len(sel.ids) == len(sel.records) == 5
  assert sel.scores == sorted(sel.scores, reverse=True)
  for row, rec in zip(sel.rows, sel.records):
    assert (rec.file, rec.row, rec.uid) == (row["file"], row["row"], row["uid"])
    assert rec.fields["text"] == row["text"] and row["uid"] == f"{row['file']}:{row['row']}"
  assert json.loads(next((tmp_path / "w").glob("**/cursor.json")).read_text())["done"]


def test_streamed_scores_equal_in_memory_scores_and_resume(setup, tmp_path):
  """score_pool of a FilePool gives each example the score score_pool of the same examples as
  a list gives it; a run stopped after its first chunk resumes to the same chunk files."""
  import jax
  from flax import nnx
  from jbat import io, lora
  from jbat.models.causal_lm import CausalLM, LMConfig
  from jbat.scoring import stream
  from jbat.surrogate import Surrogate
  d, tok = setup
  pool = pool_stream.FilePool(pool_spec(d), fmt="text", fields=formats.Fields(), id_field="",
                              tokenizer=tok, max_len=32)
  model = CausalLM(LMConfig(vocab_size=len(tok), max_len=32, d_model=16, n_layers=1,
                            n_heads=2, d_ff=32), rngs=nnx.Rngs(0))
  lora.apply_lora(model, lora.LoRAConfig(rank=2), rngs=nnx.Rngs(1))
  graphdef, phi0, rest = lora.split(model)
  sur = Surrogate(graphdef, phi0, jax.tree.map(lambda x: x + 0.05, phi0), rest)
  batches = stream.Batches(8, 32, tok.pad_token_id, chunk_batches=2)
  scores = ["loss_diff", "random"]
  got = stream.score_pool(scores, sur, pool, tmp_path / "s", batches, progress=False)
  examples = [pool_stream.training_example(ex) for ex in pool.local_examples()]
  want = stream.score_pool(scores, sur, examples, tmp_path / "m", batches, progress=False)
  a, b = got.sorted_by_id(), want.sorted_by_id()
  np.testing.assert_array_equal(a.ids, b.ids)
  for s in scores:
    np.testing.assert_allclose(a.scores[s], b.scores[s], rtol=1e-5, atol=1e-6)
  cursor = json.loads((tmp_path / "s/cursor.json").read_text())
  assert cursor["n_chunks"] == 4 and cursor["pool_counts"]["read"] == sum(N_ROWS)
  # As if killed after chunk 0: the cursor points at chunk 1 and later chunks are gone.
  before = {p.name: p.read_bytes() for p in (tmp_path / "s").glob("chunk_*.npz")}
  for p in (tmp_path / "s").glob("chunk_*.npz"):
    if p.name != "chunk_000000.npz":
      p.unlink()
  io.write_json_atomic(tmp_path / "s/cursor.json", dict(cursor, next_chunk=1, done=False,
                                                         n_chunks=None))
  again = stream.score_pool(scores, sur, pool, tmp_path / "s", batches, progress=False)
  assert {p.name: p.read_bytes() for p in (tmp_path / "s").glob("chunk_*.npz")} == before
  np.testing.assert_array_equal(again.ids, got.ids)
  # Merged by id, one row per id: a repeated id keeps its first location.
  t = stream.ScoreTable(ids=np.array([5, 3, 5]), scores={"x": np.array([1., 2., 3.])},
                        meta={"file": np.array([1, 0, 0]), "row": np.array([0, 7, 2])})
  m = t.sorted_by_id()
  assert m.ids.tolist() == [3, 5] and m.scores["x"].tolist() == [2., 3.]


def test_parquet_without_the_text_column_fails_before_streaming(setup, tmp_path):
  from jbat.errors import JbatError
  d, tok = setup
  pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "bad.parquet")
  with pytest.raises(JbatError, match=r"bad.parquet: Parquet file has no column 'text'"):
    pool_stream.FilePool(f"{pool_spec(d)},{tmp_path / 'bad.parquet'}", fmt="text",
                         fields=formats.Fields(), id_field="", tokenizer=tok, max_len=32)
