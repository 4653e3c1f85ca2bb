"""Token pipeline: encode documents, pad or pack them into fixed-shape batches, and stream them.

Every batch is a dict of numpy arrays with fixed shapes (B = batch size, L = max_len):

  tokens      int32[B, L]    model inputs
  targets     int32[B, L]    next token of each input (the loss target)
  weights     float32[B, L]  the loss weight of each target: the example's own "weights"
                             (e.g. 0 on prompt tokens, see `jbat.data.formats`), else 1.0
                             on every real target; 0.0 on padding
  positions   int32[B, L]    position of each token inside its document (0, 1, 2, ...)
  segment_ids int32[B, L]    1, 2, ... = which document of the row a token belongs to; 0 = pad
  id          int64[B]       document id (padded mode) / first document of the row (packed); -1
                             on padding rows
  valid       bool[B]        False on padding rows

An encoded example is {"id": int, "ids": int32[n]} with ids = [bos, t_1, ..., t_k, eos]
truncated to at most L + 1 tokens, optionally with "weights": float32[n - 1], the loss weight
of each target (aligned with ids[1:]; absent: 1.0 each). It contributes n - 1 (input,
target) pairs: (ids[j], ids[j+1]) for j < n - 1. So the eos token is a target (the model
learns to stop) and, when packing, no target ever crosses into another document: the pairs of one document are
laid out contiguously in one row, one segment per document.

The training stream (`train_loader`) is a grain pipeline, in process (no workers):
  MapDataset.source(examples) -> slice[shard_index::shard_count] -> shuffle(seed) -> repeat
  (reshuffled each epoch) -> batch + pad, or -> greedy packing.
Sharding happens first, so the shards of one epoch are disjoint and their union is the whole
dataset. Its iterator has `get_state()` / `set_state()`: the state is a small JSON-serialisable
dict (see `state_to_json` / `state_from_json`); restoring it into a loader built with the same
arguments continues with exactly the same batches.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from jbat.errors import JbatError

Example = dict[str, Any]
Batch = dict[str, np.ndarray]

_ENCODE_CHUNK = 1024


def hash_examples(h: Any, examples: Sequence[Example]) -> None:
  """Feeds encoded examples (ids and token ids, in order) to a hashlib object."""
  for ex in examples:
    h.update(np.int64(ex["id"]).tobytes())
    h.update(np.asarray(ex["ids"], np.int32).tobytes())
    if "weights" in ex:  # Absent: the hash of an unweighted example is unchanged.
      h.update(b"w")
      h.update(np.asarray(ex["weights"], np.float32).tobytes())
    h.update(b"\x00")


def encode(docs: Sequence[Any], tokenizer: Any, max_len: int) -> list[Example]:
  """Tokenizes documents (anything with `.id` and `.text`) to [bos, ..., eos], max L+1 tokens.

  Uses the tokenizer's batched call (add_special_tokens=False) in chunks; bos/eos are added
  here so every tokenizer gets the same framing. A document truncated at L+1 tokens loses its
  eos.

  Returns:
    one {"id": int, "ids": int32[n]} per document, 2 <= n <= max_len + 1, in input order.
  """
  if max_len < 1:
    raise JbatError(f"max_len must be >= 1, got {max_len}.")
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  if bos is None or eos is None:
    raise JbatError("the tokenizer needs bos and eos tokens (see jbat.data.tokenizer).")
  out = []
  for start in range(0, len(docs), _ENCODE_CHUNK):
    chunk = docs[start : start + _ENCODE_CHUNK]
    ids = tokenizer([d.text for d in chunk], add_special_tokens=False)["input_ids"]
    for doc, toks in zip(chunk, ids):
      seq = np.asarray([bos, *toks, eos][: max_len + 1], dtype=np.int32)
      out.append({"id": int(doc.id), "ids": seq})
  return out


def _empty_batch(batch_size: int, max_len: int, pad_id: int) -> Batch:
  return {
      "tokens": np.full((batch_size, max_len), pad_id, np.int32),
      "targets": np.full((batch_size, max_len), pad_id, np.int32),
      "weights": np.zeros((batch_size, max_len), np.float32),
      "positions": np.zeros((batch_size, max_len), np.int32),
      "segment_ids": np.zeros((batch_size, max_len), np.int32),
      "id": np.full((batch_size,), -1, np.int64),
      "valid": np.zeros((batch_size,), bool),
  }


def _pairs(example: Example, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of one example: ids[:-1], ids[1:] after truncation to L + 1 tokens."""
  ids = np.asarray(example["ids"], np.int32)[: max_len + 1]
  return ids[:-1], ids[1:]


def _weights(example: Example, n: int) -> np.ndarray | float:
  """The loss weights of the first n targets of an example: its "weights" or 1.0."""
  if "weights" not in example:
    return 1.0
  w = np.asarray(example["weights"], np.float32)[:n]
  if len(w) != n:
    raise JbatError(f"example {example['id']}: {len(w)} weights for {n} targets (weights must "
                    "be aligned with ids[1:]).")
  return w


def pad_batch(examples: Sequence[Example], batch_size: int, max_len: int, pad_id: int) -> Batch:
  """One example per row, right-padded to L; rows past len(examples) are padding rows.

  Row i (an example with n ids): tokens[i, :n-1] = ids[:-1], targets[i, :n-1] = ids[1:],
  weights = the example's weights (1 without them), segment_ids = 1 there, positions =
  0 .. n-2; everything else pad / 0.
  """
  if len(examples) > batch_size:
    raise JbatError(f"pad_batch got {len(examples)} examples for batch_size {batch_size}.")
  batch = _empty_batch(batch_size, max_len, pad_id)
  for i, ex in enumerate(examples):
    inputs, targets = _pairs(ex, max_len)
    n = len(inputs)
    batch["tokens"][i, :n] = inputs
    batch["targets"][i, :n] = targets
    batch["weights"][i, :n] = _weights(ex, n)
    batch["positions"][i, :n] = np.arange(n)
    batch["segment_ids"][i, :n] = 1
    batch["id"][i] = ex["id"]
    batch["valid"][i] = True
  return batch


def pack_rows(lengths: Sequence[int], batch_size: int, max_len: int) -> list[list[int]]:
  """Next-fit layout: example j (with lengths[j] pairs) goes into the current row if it fits,
  else it opens the next row. Stops before the first example that would need row B + 1.

  Returns:
    rows, a list of at most B lists of example indices; the examples used are a prefix
    0 .. m-1 of the input (m = sum of row sizes).
  """
  rows: list[list[int]] = []
  used = max_len  # forces a new row for the first example
  for j, n in enumerate(lengths):
    n = min(n, max_len)
    if used + n > max_len:
      if len(rows) == batch_size:
        break
      rows.append([])
      used = 0
    rows[-1].append(j)
    used += n
  return rows


def pack_batch(examples: Sequence[Example], batch_size: int, max_len: int, pad_id: int) -> Batch:
  """Packs examples (in order, next-fit, see `pack_rows`) into B rows of L tokens.

  Inside a row the k-th document (k = 1, 2, ...) has segment_ids k, positions restarting at
  0, and its own (input, target) pairs only, so no target crosses a document boundary and the
  eos of each document is a target. Remaining space: pad tokens, weight 0, segment 0.
  id[i] = id of the first document in row i (-1 for an empty row); valid[i] = row is non-empty.

  Raises:
    JbatError: the examples do not all fit in B rows.
  """
  pairs = [_pairs(ex, max_len) for ex in examples]
  rows = pack_rows([len(p[0]) for p in pairs], batch_size, max_len)
  if sum(len(r) for r in rows) != len(examples):
    raise JbatError(f"pack_batch: {len(examples)} examples do not fit in {batch_size} rows.")
  batch = _empty_batch(batch_size, max_len, pad_id)
  for i, row in enumerate(rows):
    start = 0
    for k, j in enumerate(row, start=1):
      inputs, targets = pairs[j]
      end = start + len(inputs)
      batch["tokens"][i, start:end] = inputs
      batch["targets"][i, start:end] = targets
      batch["weights"][i, start:end] = _weights(examples[j], len(inputs))
      batch["positions"][i, start:end] = np.arange(len(inputs))
      batch["segment_ids"][i, start:end] = k
      start = end
    batch["id"][i] = examples[row[0]]["id"]
    batch["valid"][i] = True
  return batch


# ----------------------------------------------------------------------------- streams


def _shard(examples: Sequence[Example], shard_index: int, shard_count: int) -> grain.MapDataset:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise JbatError(f"bad shard {shard_index} of {shard_count}: need 0 <= index < count.")
  if len(examples) == 0:
    raise JbatError("no examples to load (the dataset is empty).")
  short = [ex["id"] for ex in examples if len(ex["ids"]) < 2]
  if short:
    raise JbatError(
        f"{len(short)} examples have fewer than 2 token ids (no (input, target) pair), e.g. "
        f"id {short[0]}: encode() frames every document as [bos, ..., eos]."
    )
  ds = grain.MapDataset.source(list(examples))
  if shard_count > 1:
    ds = ds.slice(slice(shard_index, None, shard_count))
  if len(ds) == 0:
    raise JbatError(
        f"shard {shard_index} of {shard_count} is empty: only {len(examples)} examples."
    )
  return ds


class PackedBatchIterator(grain.DatasetIterator):
  """Infinite packed batches read from an (infinite) example MapDataset by index.

  Each batch takes the longest prefix of the remaining stream that next-fit packing places in
  B rows, so the state is a single integer: the index of the next example.
  """

  def __init__(self, stream: grain.MapDataset, batch_size: int, max_len: int, pad_id: int):
    super().__init__()
    self._stream = stream
    self._batch_size = batch_size
    self._max_len = max_len
    self._pad_id = pad_id
    self._next = 0

  def __next__(self) -> Batch:
    # Next-fit simulation (same rule as `pack_rows`), reading examples lazily by index.
    examples, rows, used = [], 0, self._max_len
    while True:
      ex = self._stream[self._next + len(examples)]
      n = min(len(_pairs(ex, self._max_len)[0]), self._max_len)
      if used + n > self._max_len:
        if rows == self._batch_size:
          break
        rows, used = rows + 1, 0
      examples.append(ex)
      used += n
    self._next += len(examples)
    return pack_batch(examples, self._batch_size, self._max_len, self._pad_id)

  def get_state(self) -> dict[str, Any]:
    return {"next_example": int(self._next)}

  def set_state(self, state: dict[str, Any]) -> None:
    if "next_example" not in state:
      raise JbatError(f"not a packed-loader state: {state!r} (expected key 'next_example').")
    self._next = int(state["next_example"])


def train_loader(
    examples: Sequence[Example],
    batch_size: int,
    max_len: int,
    pad_id: int,
    seed: int,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    pack: bool = False,
) -> grain.DatasetIterator:
  """Infinite, deterministic stream of training batches for this process's shard.

  Pipeline: source -> slice[shard_index::shard_count] -> shuffle(seed) -> repeat (a fresh
  permutation every epoch) -> pad_batch of B consecutive examples (batches may straddle an
  epoch boundary), or -> greedy packing (`PackedBatchIterator`).

  Returns:
    a grain DatasetIterator; `get_state()` is a JSON-serialisable dict, `set_state()` restores
    it (the loader must be built with the same arguments).
  """
  if batch_size < 1:
    raise JbatError(f"batch_size must be >= 1, got {batch_size}.")
  stream = _shard(examples, shard_index, shard_count).shuffle(seed=seed).repeat(None)
  if pack:
    return PackedBatchIterator(stream, batch_size, max_len, pad_id)
  batched = stream.batch(
      batch_size,
      drop_remainder=True,
      batch_fn=lambda exs: pad_batch(exs, batch_size, max_len, pad_id),
  )
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(batched.to_iter_dataset(read))


def state_to_json(state: dict[str, Any]) -> str:
  """Loader state -> JSON text (for saving next to a checkpoint)."""
  return json.dumps(state, sort_keys=True, default=int)


def state_from_json(text: str) -> dict[str, Any]:
  """JSON text -> loader state for `set_state`."""
  try:
    state = json.loads(text)
  except json.JSONDecodeError as e:
    raise JbatError(f"data loader state is not valid JSON: {e.msg}.") from e
  if not isinstance(state, dict):
    raise JbatError(f"data loader state must be a JSON object, got {type(state).__name__}.")
  return state


def num_eval_batches(n_examples: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches per shard in `eval_batches`: ceil(ceil(N / shards) / B), the same on every shard."""
  return math.ceil(math.ceil(n_examples / shard_count) / batch_size)


def eval_batches(
    examples: Sequence[Example],
    batch_size: int,
    max_len: int,
    pad_id: int,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Iterator[Batch]:
  """One ordered pass over this shard (examples[shard_index::shard_count]), padded batches.

  Every shard yields exactly `num_eval_batches(len(examples), B, shard_count)` batches (shorter
  shards get extra all-invalid batches), so processes stay in lockstep. Padding rows have
  valid False, id -1 and weight 0.
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise JbatError(f"bad shard {shard_index} of {shard_count}: need 0 <= index < count.")
  mine = list(examples)[shard_index::shard_count]
  for b in range(num_eval_batches(len(examples), batch_size, shard_count)):
    yield pad_batch(mine[b * batch_size : (b + 1) * batch_size], batch_size, max_len, pad_id)
