"""The Python API for notebooks: ALBAT selection and adapter training without the CLI.

  import jbat
  sel = jbat.select("models/SmolLM2-135M", None, "task/train.jsonl", "pool/*.parquet", k=256,
                    format="chat")
  sel.ids[:5], sel.scores[:5], sel.rows[0]["text"]
  model, fit = jbat.adapt("models/SmolLM2-135M", None, "task/train.jsonl", selection=sel,
                          valid="task/valid.jsonl", format="chat", steps=200)

`model` is a jbat `CausalLM` or the path of a Hugging Face model folder (then `tokenizer` may
be None: the folder's own). `adapt`, `valid` and `pool` are each a file spec (comma-separated
JSONL / JSONL.gz / Parquet files, globs or text folders, see `jbat.data.files`), or a list of
records: dicts with the format's fields, or plain strings (format "text"). Formats and loss
weights are `jbat.data.formats`' (response-only for prompt_response and chat). Both functions
run in a temporary folder unless `workdir` is given (then they resume / reuse what is there,
like the CLI). They are the same stages the CLI runs (`albat.select_backbone_data`,
`mixture.mixture_loader` + `loop.fit`), with the same defaults as `configs/hf_lora.py`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

from jbat.errors import JbatError

Source = str | Sequence[Any]


@dataclasses.dataclass(frozen=True)
class Selection:
  """What `select` chose, in rank order.

  Attributes:
    ids: the stable string ids of the selected pool records (the id field's value, "<file>:<row>"
      for files, "pool:<i>" for a list).
    scores: their scores (`score`), best first.
    rows: one dict per selected record: id (integer), uid, file, row, score, rank, text.
    records: the selected `files.Record`s (their fields as read), for `adapt(selection=...)`.
    manifest: the manifest file written (under `workdir`, gone with a temporary one).
  """

  ids: list[str]
  scores: list[float]
  rows: list[dict]
  records: list
  manifest: pathlib.Path


def records(source: Source, what: str, fmt: str = "text", fields=None, id_field: str = ""):
  """`files.Record`s of a file spec, or of a list of dicts / strings (uid "<what>:<i>", or the
  id field's value)."""
  from jbat.data import files, formats
  fields = fields or formats.Fields()
  need = formats.required_fields(fmt, fields)
  if isinstance(source, (str, pathlib.Path)):
    return files.read_all(str(source), fields=need, text_field=fields.text, id_field=id_field,
                          what=what)
  out = []
  for i, x in enumerate(source):
    if isinstance(x, files.Record):
      out.append(x)
      continue
    row = {fields.text: x} if isinstance(x, str) else dict(x)
    uid = str(row[id_field]) if id_field and id_field in row else f"{what}:{i}"
    out.append(files.Record(uid=uid, id=files.stable_id(uid), file=what, row=i, line=None,
                            fields=row))
  if not out:
    raise JbatError(f"{what}: no records given")
  return out


def _model(model, tokenizer, dtype: str = "float32"):
  if isinstance(model, (str, pathlib.Path)):
    from jbat.models.hf_io import load_causal_lm
    base, tok = load_causal_lm(model, dtype=dtype)
    return base, tokenizer or tok
  if tokenizer is None:
    raise JbatError("jbat.select / jbat.adapt: give the tokenizer of a model passed as a module")
  return model, tokenizer


def _encode(recs, tokenizer, max_len: int, fmt: str, fields, what: str) -> list[dict]:
  from jbat.data import formats
  examples, _ = formats.encode_records(recs, tokenizer, max_len, fmt, fields)
  if not examples:
    raise JbatError(f"{what}: every example was cut away by max_len={max_len} (or is empty)")
  return examples


def _workdir(workdir) -> tuple[pathlib.Path, Any]:
  if workdir is not None:
    return pathlib.Path(workdir), None
  tmp = tempfile.TemporaryDirectory(prefix="jbat-")
  return pathlib.Path(tmp.name), tmp


def select(model, tokenizer, adapt: Source, pool: Source, *, k: int = 256,
           score: str = "rel_loss_diff", rule: str = "threshold_uniform", top_n: int = 1500,
           tau: float | None | str = "default", format: str = "text",  # noqa: A002
           pool_format: str = "text", fields=None, id_field: str = "", max_len: int = 256,
           lora_rank: int = 8, lora_alpha: float = 16.0, surrogate_steps: int = 60,
           lr: float = 2e-4, batch_size: int = 32, seed: int = 0,
           workdir: str | pathlib.Path | None = None, progress: bool = False) -> Selection:
  """ALBAT selection of `k` pool records for the task `adapt`: a LoRA surrogate trained on
  adapt (`surrogate_steps`, `lr`), the pool scored by `score` and `rule` applied (see
  `jbat.selection.select`). Pool records with the text of a task record, and pool records cut
  away by max_len, are left out. A pool given as a file spec is streamed (read and tokenized a
  chunk at a time, `jbat.data.pool_stream`; the selected records are read again by location);
  a list is encoded in memory. Returns a `Selection`."""
  from jbat import albat, lora, registry, selection as selection_lib
  from jbat.data import formats, sources
  from jbat.training import loop
  base, tok = _model(model, tokenizer)
  fields = fields or formats.Fields()
  a_recs = records(adapt, "adapt", format, fields, id_field)
  a_ex = _encode(a_recs, tok, max_len, format, fields, "adapt")
  a_docs = [sources.Document(id=r.id, text=formats.record_text(r, format, fields),
                             source=r.file) for r in a_recs]
  if isinstance(pool, (str, pathlib.Path)):
    return _select_streamed(base, tok, a_docs, a_ex, str(pool), k=k, score=score, rule=rule,
                            top_n=top_n, tau=tau, pool_format=pool_format, fields=fields,
                            id_field=id_field, max_len=max_len, lora_rank=lora_rank,
                            lora_alpha=lora_alpha, surrogate_steps=surrogate_steps, lr=lr,
                            batch_size=batch_size, seed=seed, workdir=workdir,
                            progress=progress)
  p_recs = records(pool, "pool", pool_format, fields, id_field)
  p_ex = _encode(p_recs, tok, max_len, pool_format, fields, "pool")
  task_hashes = {sources.text_hash(formats.record_text(r, format, fields)) for r in a_recs}
  by_id = {r.id: r for r in p_recs}
  kept, seen = [], set()
  for e in p_ex:
    r = by_id[e["id"]]
    text = formats.record_text(r, pool_format, fields)
    if sources.text_hash(text) not in task_hashes and e["id"] not in seen:
      seen.add(e["id"])
      kept.append((e, r, text))
  if not kept:
    raise JbatError("pool: no usable records (all cut by max_len, empty or equal to the task's)")
  from jbat.experiment import PoolDocument
  docs = [PoolDocument(id=r.id, text=t, source=r.file, manifest_fields={
      "uid": r.uid, "file": r.file, "row": r.row, "text": t}) for _, r, t in kept]
  task = sources.Task(adapt=[sources.Document(id=r.id, text=formats.record_text(r, format, fields),
                                              source=r.file) for r in a_recs],
                      heldout=[], pool=docs)
  spec = selection_lib.SelectSpec(
      score=score, k=registry.pool_k(k, len(docs)),
      tau=None if tau is None else registry.parse_tau(tau), rule=rule, top_n=top_n, seed=seed,
      batch_size=batch_size)
  sur_spec = loop.TrainSpec(steps=surrogate_steps, lr=lr, eval_every=0,
                            ckpt_every=surrogate_steps, seed=seed)
  folder, tmp = _workdir(workdir)
  manifest = albat.select_backbone_data(
      base, lora.LoRAConfig(rank=lora_rank, alpha=lora_alpha), task, tok, spec,
      surrogate_spec=sur_spec, max_len=max_len, seed=seed, workdir=folder, progress=progress,
      adapt_examples=a_ex, pool_examples=[e for e, _, _ in kept])
  from jbat import io
  rows = io.read_jsonl(manifest)
  rec_by_id = {r.id: r for _, r, _ in kept}
  out = Selection(ids=[r["uid"] for r in rows], scores=[r["score"] for r in rows], rows=rows,
                  records=[rec_by_id[r["id"]] for r in rows], manifest=manifest)
  if tmp is not None:
    tmp.cleanup()
  return out


def _select_streamed(base, tok, a_docs, a_ex, pool: str, *, k, score, rule, top_n, tau,
                     pool_format, fields, id_field, max_len, lora_rank, lora_alpha,
                     surrogate_steps, lr, batch_size, seed, workdir, progress) -> Selection:
  """`select` of a pool given as files: streamed through scoring (`pool_stream.FilePool`)."""
  from jbat import albat, io, lora, registry, selection as selection_lib
  from jbat.data import pool_stream, sources
  from jbat.training import loop
  file_pool = pool_stream.FilePool(pool, fmt=pool_format, fields=fields, id_field=id_field,
                                   tokenizer=tok, max_len=max_len,
                                   task_texts=[d.text for d in a_docs])
  spec = selection_lib.SelectSpec(
      score=score, k=int(k), tau=None if tau is None else registry.parse_tau(tau), rule=rule,
      top_n=top_n, seed=seed, batch_size=batch_size)
  sur_spec = loop.TrainSpec(steps=surrogate_steps, lr=lr, eval_every=0,
                            ckpt_every=surrogate_steps, seed=seed)
  folder, tmp = _workdir(workdir)
  manifest = albat.select_backbone_data(
      base, lora.LoRAConfig(rank=lora_rank, alpha=lora_alpha),
      sources.Task(adapt=a_docs, heldout=[], pool=[]), tok, spec, surrogate_spec=sur_spec,
      max_len=max_len, seed=seed, workdir=folder, progress=progress, adapt_examples=a_ex,
      pool_examples=file_pool)
  rows = io.read_jsonl(manifest)
  index = {f: i for i, f in enumerate(file_pool.files)}
  got = file_pool.read([(index[r["file"]], r["row"]) for r in rows])
  out = Selection(ids=[r["uid"] for r in rows], scores=[r["score"] for r in rows], rows=rows,
                  records=[ex["record"] for ex in got], manifest=manifest)
  if tmp is not None:
    tmp.cleanup()
  return out


def adapt(model, tokenizer, adapt: Source, *, selection: Selection | Source | None = None,
          valid: Source | None = None, format: str = "text",  # noqa: A002
          pool_format: str = "text", fields=None, id_field: str = "", max_len: int = 256,
          lora_rank: int = 8, lora_alpha: float = 16.0, steps: int = 200, lr: float = 2e-4,
          batch_size: int = 8, rho: float = 0.5, lam: float = 1.0, eval_every: int = 20,
          seed: int = 0, workdir: str | pathlib.Path | None = None, progress: bool = False):
  """Trains a LoRA adapter on `adapt` plus the selected pool records (`selection`: a
  `Selection`, or records / a spec in pool_format; None: plain LoRA), each batch
  `batch_size` task rows plus rho / (1 - rho) as many selected rows (loss weight `lam`), as
  the CLI's BAT arms. With `valid`, the adapter of the best validation step is returned.

  Returns:
    (the model with the trained adapter applied, a copy; `loop.FitResult`).
  """
  from flax import nnx

  from jbat import lora
  from jbat.data import formats, mixture, pipeline
  from jbat.training import loop
  base, tok = _model(model, tokenizer)
  fields = fields or formats.Fields()
  a_ex = _encode(records(adapt, "adapt", format, fields, id_field), tok, max_len, format,
                 fields, "adapt")
  sel_ex: list[dict] = []
  if selection is not None:
    recs = selection.records if isinstance(selection, Selection) else records(
        selection, "selection", pool_format, fields, id_field)
    sel_ex = _encode(recs, tok, max_len, pool_format, fields, "selection")
  v_ex = (_encode(records(valid, "valid", format, fields, id_field), tok, max_len, format,
                  fields, "valid") if valid is not None else None)
  r = rho if sel_ex else 0.0
  rows = int(round(batch_size / (1.0 - r)))
  m = nnx.clone(base)
  lora.apply_lora(m, lora.LoRAConfig(rank=lora_rank, alpha=lora_alpha), rngs=nnx.Rngs(seed))
  train_iter = mixture.mixture_loader(a_ex, sel_ex or None, rows, max_len, tok.pad_token_id,
                                      seed, rho=r, lam=lam)
  spec = loop.TrainSpec(steps=steps, lr=lr, eval_every=eval_every if v_ex else 0,
                        ckpt_every=steps, seed=seed)
  folder, tmp = _workdir(workdir)
  result = loop.fit(
      m, nnx.LoRAParam, train_iter, spec, folder, progress=progress, desc="adapt",
      eval_batches=(lambda: pipeline.eval_batches(v_ex, 32, max_len, tok.pad_token_id))
      if v_ex else None)
  nnx.update(m, result.best_params if result.best_params is not None else result.params)
  if tmp is not None:
    tmp.cleanup()
  return m, result
