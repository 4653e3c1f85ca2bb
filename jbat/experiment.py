"""The main job, top to bottom: data -> tokenizer -> backbone -> selection -> BAT arms -> report.

`run(config)` is what `python -m jbat.train --config configs/<name>.py` executes after the config
has been validated. Each stage is a call into its module; this file only wires them together,
so a reader can follow an experiment from here.

Arms (`config.arms`), all trained with the same steps, learning rate, adaptation rows per batch
and seeds (`config.seeds`), paired by seed:
  none      plain LoRA adaptation on the adaptation set;
  random    + `select.k` pool documents drawn uniformly;
  oracle    + `select.k` pool documents of the target domain (a reference, needs labels);
  albat     + the ALBAT selection: `select.score` ranked by `select.rule`;
  <score>   + the selection by that score (e.g. align, loss_diff, less, dsir) with `select.rule`.
Backbone arms put `bat.rho` of each batch on the selected documents (their loss weighted by
`bat.lam`) on top of the same `train.batch_size` adaptation rows. The selection is computed once
(with `config.seed`) and shared by all training seeds. With `bat.reselect_every` the model-score
arms select again around each seed's adapter every that many steps (`make_reselector`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jbat import albat, backbone, distributed, io, layout, lora, metrics, registry, report
from jbat import selection
from jbat import config as config_lib
from jbat import peft_io
from jbat.data import dictd, files, formats, mixture, pipeline, sources, splits
from jbat.data import tokenizer as tokenizer_lib, tweets
from jbat.errors import Diverged, JbatError
from jbat.models import generate as generate_lib
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.models.hf_io import load_causal_lm
from jbat.training import loop


@dataclasses.dataclass(frozen=True)
class PoolDocument(sources.Document):
  """A pool document read from the user's files: `manifest_fields` (uid, file, row, text) go
  into the selection manifest (`selection.write_manifest`)."""

  manifest_fields: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)


@dataclasses.dataclass
class OwnData:
  """The user's task (data.adapt and friends), encoded in data.format / data.pool_format.

  adapt / valid / test: encoded task examples (response-only loss weights); pool_by_id: id ->
  encoded pool example; counts: what was read, cut by max_len, dropped (reported)."""

  adapt: list
  valid: list
  test: list
  pool_by_id: dict
  counts: dict
  oracle: list = dataclasses.field(default_factory=list)  # data.oracle's PoolDocuments.
  prompts: list = dataclasses.field(default_factory=list)  # Test (prompt ids, reference).
  test_nll_backbone: float | None = None  # data.test's NLL before adaptation (once per run).


def own_data(config: ml_collections.ConfigDict) -> bool:
  """Whether the run takes the user's path (data.adapt set) instead of a labelled corpus."""
  return bool(config.data.adapt)


def target_label(config: ml_collections.ConfigDict) -> str | None:
  """The label that counts as on-target in a selection (precision); None without labels."""
  return None if own_data(config) else config.data.domain


def check_own_config(config: ml_collections.ConfigDict) -> None:
  """JbatError (before any work) for the user's path: no oracle arm without labels, a
  validation split to choose steps on, a pool for the arms that select."""
  arms = config_lib.arm_list(config)
  if "oracle" in arms and not config.data.oracle:
    raise JbatError("config: arms: 'oracle' needs a labelled corpus (data.source + data.domain), "
                    "or with data.adapt a file of more target examples (data.oracle); with "
                    "neither there are no labels: drop the oracle arm")
  if config.eval.generate and config.data.format == "text":
    raise JbatError("config: eval.generate needs prompts: data.format 'chat' or "
                    "'prompt_response', not 'text'")
  if not config.data.valid:
    raise JbatError("config: data.valid is required with data.adapt (files, or a count split "
                    "off data.adapt): every arm chooses its best step on it")
  if any(a != "none" for a in arms) and not config.data.pool:
    raise JbatError("config: data.pool is required for the arms that add backbone data "
                    f"({', '.join(a for a in arms if a != 'none')})")


def _task_doc(r: files.Record, fmt: str, f: formats.Fields) -> sources.Document:
  return sources.Document(id=r.id, text=formats.record_text(r, fmt, f), source=r.file)


def load_own_task(config: ml_collections.ConfigDict
                  ) -> tuple[sources.Task, splits.TaskRecords, list[files.Record]]:
  """The user's task as a `sources.Task` (heldout = the validation split) plus its records
  and the pool's records. The pool is read whole on every process (every process scores the
  whole pool list; `stream.score_pool` shards the batches)."""
  d = config.data
  f = splits.fields(d)
  recs = splits.load_task(d, config.seed)
  pool_recs = list(splits.pool_reader(d)) if d.pool else []
  task = sources.Task(adapt=[_task_doc(r, d.format, f) for r in recs.adapt],
                      heldout=[_task_doc(r, d.format, f) for r in recs.valid],
                      pool=[_task_doc(r, d.pool_format, f) for r in pool_recs])
  return task, recs, pool_recs


def encode_own_task(config: ml_collections.ConfigDict, task: sources.Task,
                    recs: splits.TaskRecords, pool_recs: Sequence[files.Record], tok
                    ) -> tuple[sources.Task, OwnData]:
  """Encodes the user's task and pool with the model's tokenizer. Pool records whose text
  equals a task example's, repeated ids, and pool records cut away by max_len are dropped
  (counted). Returns the task with those pool documents only, as `PoolDocument`s."""
  d, max_len = config.data, config.data.max_len
  f = splits.fields(d)
  counts: dict[str, Any] = {}
  enc = {}
  for name, rs in (("adapt", recs.adapt), ("valid", recs.valid), ("test", recs.test)):
    enc[name], st = splits.encode_task(rs, d, tok, max_len)
    counts[name] = {"read": len(rs), "kept": st.kept, "cut_by_max_len": st.cut,
                    "empty": st.empty}
    if rs and not enc[name]:
      raise JbatError(f"data.{name}: every example was cut away by data.max_len={max_len} "
                      "(or is empty); raise data.max_len")
  pool_ex, st = formats.encode_records(pool_recs, tok, max_len, d.pool_format, f)
  by_id = {e["id"]: e for e in pool_ex}
  task_hashes = {sources.text_hash(doc.text) for doc in (*task.adapt, *task.heldout)}
  task_hashes |= {sources.text_hash(formats.record_text(r, d.format, f)) for r in recs.test}
  docs, seen, overlap, repeated = [], set(), 0, 0
  for r, doc in zip(pool_recs, task.pool):
    if r.id not in by_id:
      continue
    if r.id in seen:
      repeated += 1
      continue
    if sources.text_hash(doc.text) in task_hashes:
      overlap += 1
      continue
    seen.add(r.id)
    docs.append(PoolDocument(id=r.id, text=doc.text, source=r.file, manifest_fields={
        "uid": r.uid, "file": r.file, "row": r.row, "text": doc.text}))
  counts["pool"] = {"read": len(pool_recs), "kept": len(docs), "cut_by_max_len": st.cut,
                    "empty": st.empty, "same_text_as_task": overlap, "repeated_id": repeated}
  own = OwnData(adapt=enc["adapt"], valid=enc["valid"], test=enc["test"],
                pool_by_id={doc.id: by_id[doc.id] for doc in docs}, counts=counts)
  return dataclasses.replace(task, pool=docs), own


def log(msg: str) -> None:
  if distributed.is_main():
    print(f"[jbat] {msg}", flush=True)


def load_corpus(config: ml_collections.ConfigDict, cache: pathlib.Path) -> list[sources.Document]:
  d = config.data
  if d.source == "fortunes":
    return sources.load_fortunes(sources.fortunes_dir(cache / "corpora"))
  if d.source == "healthtweets":
    return tweets.load_health_tweets(tweets.tweets_zip(cache / "corpora"))
  if d.source == "jsonl":
    return sources.load_jsonl(d.path, text_field=d.text_field, label_field=d.label_field or None)
  return sources.load_text_folder(d.path)


def lm_config(config: ml_collections.ConfigDict, vocab_size: int) -> LMConfig:
  m = config.model
  cfg = LMConfig(vocab_size=vocab_size, max_len=config.data.max_len, d_model=m.d_model,
                 n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads or None,
                 d_ff=m.d_ff, pos=m.pos, norm=m.norm, mlp=m.mlp,
                 tie_embeddings=m.tie_embeddings, qkv_bias=m.qkv_bias, bias=m.bias, dtype=m.dtype,
                 remat=m.remat)
  cfg.validate()
  return cfg


def bat_batch_size(config: ml_collections.ConfigDict, arm: str) -> int:
  """Rows per batch: train.batch_size adaptation rows, plus backbone rows for BAT arms."""
  if arm == "none":
    return config.train.batch_size
  return int(round(config.train.batch_size / (1.0 - config.bat.rho)))


def check_batch_sizes(config: ml_collections.ConfigDict, n_devices: int) -> None:
  """Global batch sizes split evenly over devices (and so over processes)."""
  sizes = {"train.batch_size": config.train.batch_size,
           "train.eval_batch_size": config.train.eval_batch_size,
           "backbone.batch_size": config.backbone.batch_size,
           "select.batch_size": config.select.batch_size}
  if any(a != "none" for a in config_lib.arm_list(config)):
    sizes["train.batch_size / (1 - bat.rho)"] = bat_batch_size(config, "random")
  for key, size in sizes.items():
    if size % n_devices:
      raise JbatError(f"config: {key}={size} must be a multiple of the number of devices "
                      f"({n_devices})")


def get_backbone(config: ml_collections.ConfigDict, pretrain_pool: Sequence[sources.Document],
                 cache: pathlib.Path, mesh) -> tuple[CausalLM, Any, pathlib.Path, bool]:
  """(backbone, tokenizer, where it lives, whether it was loaded rather than trained)."""
  if config.model.pretrained:
    log(f"backbone: loading Hugging Face model {config.model.pretrained}")
    base, tok = load_causal_lm(config.model.pretrained, dtype=config.model.dtype, mesh=mesh)
    base.cfg = dataclasses.replace(base.cfg, remat=config.model.remat)
    if config.data.max_len > base.cfg.max_len:
      raise JbatError(f"config: data.max_len={config.data.max_len} exceeds the model's "
                      f"max_position_embeddings ({base.cfg.max_len})")
    return base, tok, pathlib.Path(config.model.pretrained), True
  tok = tokenizer_lib.get_or_train_tokenizer([d.text for d in pretrain_pool],
                                             config.data.vocab_size, cache / "tokenizers")
  b = config.backbone
  spec = backbone.PretrainSpec(steps=b.steps, batch_size=b.batch_size, lr=b.lr,
                               warmup_steps=b.warmup_steps, weight_decay=b.weight_decay,
                               max_len=config.data.max_len, ckpt_every=b.ckpt_every,
                               seed=config.seed)
  log("backbone: looking up cache / pretraining on the pool")
  try:
    base, folder, cached = backbone.load_or_pretrain(lm_config(config, vocab_size=len(tok)),
                                                     spec, pretrain_pool, tok, cache, mesh=mesh,
                                                     progress=config.progress)
  except Diverged as e:
    raise e.within("backbone", "backbone.lr", stage="pretraining") from None
  return base, tok, folder, cached


def train_spec(config: ml_collections.ConfigDict, seed: int, steps: int | None = None):
  t = config.train
  return loop.TrainSpec(steps=steps or t.steps, lr=t.lr, warmup_steps=t.warmup_steps,
                        weight_decay=t.weight_decay, clip_norm=t.clip_norm,
                        eval_every=t.eval_every, ckpt_every=t.ckpt_every, keep=t.keep,
                        log_every=t.log_every, seed=seed, grad_accum=t.grad_accum)


def lora_config(config: ml_collections.ConfigDict) -> lora.LoRAConfig:
  return lora.LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                         targets=config.lora.targets, dora=bool(config.lora.get("dora", False)))


def select_arm_docs(arm: str, config: ml_collections.ConfigDict, task: sources.Task, base,
                    tok, workdir: pathlib.Path, mesh, own: OwnData | None = None
                    ) -> tuple[list[sources.Document], dict]:
  """The backbone documents an arm trains on, and facts about the selection (`own`: the
  user's encoded examples, see `albat_docs`)."""
  k = registry.pool_k(config.select.k, len(task.pool))
  t0 = time.perf_counter()
  if arm == "none":
    return [], {}
  if arm == "random":
    rng = np.random.default_rng(config.seed + 1)
    chosen = [task.pool[i] for i in sorted(rng.choice(len(task.pool), size=k, replace=False))]
  elif arm == "oracle":
    in_domain = (own.oracle if own is not None else
                 [d for d in task.pool if d.label == config.data.domain])
    if not in_domain:
      raise JbatError("arm oracle: data.oracle has no usable record" if own is not None else
                      f"arm oracle: the pool has no documents labelled {config.data.domain!r}")
    rng = np.random.default_rng(config.seed + 2)
    idx = rng.choice(len(in_domain), size=min(k, len(in_domain)), replace=False)
    chosen = [in_domain[i] for i in sorted(idx)]
  else:
    score = registry.score_for(arm, config)
    chosen = albat_docs(config, task, base, tok, score, layout.select_dir(workdir, score), mesh,
                        seed=config.seed, own=own)
  facts = {"n_selected": len(chosen), "select_seconds": time.perf_counter() - t0,
           **label_facts(chosen, target_label(config))}
  return chosen, facts


def label_facts(chosen: Sequence[sources.Document], domain: str | None) -> dict[str, Any]:
  """Label counts (most common first) and precision (share labelled `domain`) of a selection;
  for domain None (no labels) no counts and precision None."""
  if domain is None:
    return {"label_counts": {}, "precision": None}
  labels: dict[str, int] = {}
  for d in chosen:
    labels[str(d.label)] = labels.get(str(d.label), 0) + 1
  return {"label_counts": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
          "precision": (labels.get(domain, 0) / len(chosen)) if chosen else None}


def albat_docs(config: ml_collections.ConfigDict, task: sources.Task, base, tok, score: str,
               folder: pathlib.Path, mesh, *, seed: int, select_seed: int | None = None,
               init_adapter=None, own: OwnData | None = None) -> list[sources.Document]:
  """The pool documents `albat.select_backbone_data` selects by `score` with the config's rule
  (surrogate from a fresh adapter, or from `init_adapter` for a re-selection; `seed` also
  seeds the rule unless `select_seed` is given). With `own`, the surrogate and the scores use
  the user's encoded examples (response-only loss weights) instead of `pipeline.encode`."""
  sur_spec = train_spec(config, seed, steps=config.surrogate.steps)
  sur_spec = dataclasses.replace(sur_spec, eval_every=0, ckpt_every=config.surrogate.steps)
  spec = selection.SelectSpec.from_config(config, len(task.pool), score=score,
                                          seed=seed if select_seed is None else select_seed)
  manifest = albat.select_backbone_data(
      base, lora_config(config), task, tok, spec, surrogate_spec=sur_spec,
      max_len=config.data.max_len, seed=seed, workdir=folder, mesh=mesh,
      progress=config.progress, init_adapter=init_adapter,
      score_cache=config_lib.cache_dir(config) / "scores",
      surrogate_cache=config_lib.cache_dir(config) / "surrogates",
      adapt_examples=None if own is None else own.adapt,
      pool_examples=None if own is None else [own.pool_by_id[d.id] for d in task.pool])
  by_id = {d.id: d for d in task.pool}
  return [by_id[r["id"]] for r in io.read_jsonl(manifest)]


# (seed, step, adapter or None, folder) -> the re-selected documents.
Reselector = Callable[[int, int, Any, pathlib.Path], list[sources.Document]]


def make_reselector(arm: str, config: ml_collections.ConfigDict, task: sources.Task, base, tok,
                    workdir: pathlib.Path, mesh, own: OwnData | None = None
                    ) -> Reselector | None:
  """Re-selection around the current adapter for a model-score arm (None: the arm does not
  re-select, or bat.reselect_every = 0). The candidates are the top bat.reselect_top documents
  of the arm's first ranking (all of the pool for 0); the adapter may be None only when the
  folder already holds that re-selection. With bat.reselect_from = "init" (a control) the
  stage-1 surrogate is used again instead of the adapter: the same ranking, a new sample.
  The rule's seed of a re-selection is derived from (training seed, step)."""
  score = registry.score_for(arm, config)
  if not config.bat.reselect_every or not registry.reselects(score):
    return None  # No selection, or dsir / random: nothing about the adapter to re-score around.
  pool = task.pool
  if config.bat.reselect_top:
    keep = set(albat.top_pool_ids(layout.select_dir(workdir, score), score,
                                  config.bat.reselect_top))
    pool = [d for d in task.pool if d.id in keep]
  candidates = dataclasses.replace(task, pool=pool)

  from_adapter = config.bat.reselect_from == "adapter"

  def reselect(seed: int, step: int, adapter, folder: pathlib.Path) -> list[sources.Document]:
    if from_adapter and adapter is None and not layout.selection_done(folder):
      raise JbatError(f"re-selection at step {step}: {folder} holds no selection and no adapter "
                      f"was given")
    log(f"arm {arm} seed {seed}: re-selecting around "
        f"{'the adapter' if from_adapter else 'the stage-1 surrogate'} at step {step} "
        f"({len(pool)} candidates)")
    select_seed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    if not from_adapter:  # The stage-1 surrogate again (its seed), a new sample.
      return albat_docs(config, candidates, base, tok, score, folder, mesh, seed=config.seed,
                        select_seed=select_seed, own=own)
    return albat_docs(config, candidates, base, tok, score, folder, mesh, seed=seed,
                      select_seed=select_seed, init_adapter=adapter, own=own)

  return reselect


def phase_ends(steps: int, every: int) -> list[int]:
  """Last step of each re-selection phase: every, 2 every, ..., steps ([steps] for every 0)."""
  if not every or every >= steps:
    return [steps]
  return list(range(every, steps, every)) + [steps]


def train_one(arm: str, seed: int, base: CausalLM, config: ml_collections.ConfigDict,
              adapt, heldout, selected, tok, workdir: pathlib.Path, mesh,
              reselect: Reselector | None = None, own: OwnData | None = None
              ) -> dict[str, Any]:
  """Trains a fresh adapter (init and data order from `seed`); returns its summary.

  `heldout` chooses the best step (fit's evaluations). With `own` (the user's path) the test
  split `own.test` is evaluated once the training ends, never during it: at the backbone
  (step 0), at the best validation step (the best adapter fit kept) and at the final step; and
  with a Hugging Face backbone the final and best adapters are also written in PEFT format.

  With `reselect`, training runs in phases of bat.reselect_every steps (one schedule over all
  of them); after each phase but the last the backbone documents are selected again around the
  adapter as it is, under <run>/reselect/step_<t>/. A resumed run skips the phases whose next
  selection is already on disk.
  """
  model = nnx.clone(base)
  lora.apply_lora(model, lora_config(config), rngs=nnx.Rngs(seed))
  init_params = nnx.state(model, nnx.LoRAParam) if own is not None else None
  t = config.train
  n_proc, proc = jax.process_count(), jax.process_index()
  rho = 0.0 if arm == "none" else config.bat.rho
  run_dir = layout.arm_dir(workdir, arm, seed)
  ends = phase_ends(t.steps, config.bat.reselect_every if reselect else 0)
  folders = [layout.reselect_dir(run_dir, end) for end in ends[:-1]]
  done = [p + 1 for p, f in enumerate(folders) if layout.selection_done(f)]
  first = max(done, default=0)  # Phases before it reached their end and were re-selected.
  start = time.perf_counter()
  params, reselections, previous = None, [], {d["id"] for d in selected}
  for phase, end in enumerate(ends):
    if phase:
      chosen = reselect(seed, ends[phase - 1], params, folders[phase - 1])
      selected = (pipeline.encode(chosen, tok, config.data.max_len) if own is None
                  else [own.pool_by_id[d.id] for d in chosen])
      ids = {d.id for d in chosen}
      reselections.append({"step": ends[phase - 1], "overlap": len(ids & previous) / len(ids),
                           **label_facts(chosen, target_label(config))})
      previous = ids
    if phase < first:
      continue
    train_iter = mixture.mixture_loader(
        adapt, selected or None, bat_batch_size(config, arm) // n_proc, config.data.max_len,
        tok.pad_token_id, seed, rho=rho, lam=config.bat.lam, shard_index=proc,
        shard_count=n_proc, phase=phase)
    result = loop.fit(
        model, nnx.LoRAParam, train_iter, train_spec(config, seed), run_dir, mesh=mesh,
        progress=config.progress, desc=f"adapt [{arm} seed {seed}]", until=end,
        eval_batches=lambda: pipeline.eval_batches(
            heldout, t.eval_batch_size // n_proc, config.data.max_len, tok.pad_token_id,
            shard_index=proc, shard_count=n_proc))
    params = result.params
  if distributed.is_main():
    io.save_tree(result.params, run_dir / "adapter.safetensors")
  evals = [r for r in result.history if "eval_loss" in r]
  out = {"seed": seed, "backbone_nll": evals[0]["eval_loss"], "best_nll": result.best_loss,
         "best_step": result.best_step, "final_nll": evals[-1]["eval_loss"],
         "steps": max(r["step"] for r in result.history),
         "train_seconds": time.perf_counter() - start,
         "curve": [(r["step"], r["eval_loss"]) for r in evals]}
  if reselections:
    out["reselections"] = reselections
  if own is not None:
    best = result.best_params if result.best_params is not None else result.params
    if own.test:
      states = {"best": best, "final": result.params}
      if own.test_nll_backbone is None:  # The same for every arm and seed: evaluated once.
        states["backbone"] = init_params
      out.update(test_nlls(model, states, own.test, config, tok, mesh))
      own.test_nll_backbone = out.setdefault("test_nll_backbone", own.test_nll_backbone)
    if config.eval.generate and own.prompts:
      states = {"best": best, "final": result.params}
      out.update(test_answers(model, {k: states[k] for k in eval_states(config)}, own.prompts,
                              config, tok, run_dir))
    if own.test and distributed.is_main():  # This seed's test numbers, before the run ends.
      io.write_json_atomic(run_dir / "test_metrics.json",
                           {k: v for k, v in out.items() if k.startswith("test_")}, finite=True)
    export_adapters(model, config, run_dir, {"peft": result.params, "peft_best": best}, tok)
  return out


def test_nlls(model, params: dict[str, Any], test: Sequence[dict], config, tok, mesh
              ) -> dict[str, float]:
  """{"test_nll_<name>": mean token NLL of the test examples} for each adapter state in
  `params` (LoRA states of `model`)."""
  n_proc, proc = jax.process_count(), jax.process_index()
  graphdef, _, frozen = nnx.split(model, nnx.LoRAParam, ...)
  evaluate = loop.make_eval_fn(
      graphdef, distributed.place_params(frozen, mesh),
      lambda: pipeline.eval_batches(test, config.train.eval_batch_size // n_proc,
                                    config.data.max_len, tok.pad_token_id, shard_index=proc,
                                    shard_count=n_proc), mesh)
  return {f"test_nll_{name}": evaluate(distributed.place_params(p, mesh))
          for name, p in params.items()}


def eval_states(config: ml_collections.ConfigDict) -> list[str]:
  """The adapter states eval.at names ("best", "final")."""
  return [s.strip() for s in config.eval.at.split(",") if s.strip()]


def generation_prompts(records: Sequence[files.Record], config: ml_collections.ConfigDict, tok
                       ) -> list[tuple[list[int], str]]:
  """(prompt token ids, reference answer) of each task record: chat -> the conversation up to
  its last assistant turn, rendered by the chat template with the generation prompt, and that
  turn's content; prompt_response -> the prompt with the tokenizer's leading special tokens
  (jbat's tokenizer: its bos), and the response. Prompts longer than data.max_len keep their
  last max_len tokens."""
  d, f = config.data, splits.fields(config.data)
  out = []
  for r in records:
    if d.format == "chat":
      messages = r.fields[f.messages]
      last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
      text = tok.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
      ids = list(tok(text, add_special_tokens=False)["input_ids"])
      ref = messages[last]["content"]
    else:
      prefix = ([tok.bos_token_id] if formats.is_jbat_tokenizer(tok) else
                formats.special_affixes(tok)[0])
      ids = list(prefix) + list(tok(r.fields[f.prompt], add_special_tokens=False)["input_ids"])
      ref = r.fields[f.response]
    out.append((ids[-d.max_len:], ref))
  return out


def generate_texts(model, prompts: Sequence[Sequence[int]], config: ml_collections.ConfigDict,
                   tok) -> list[str]:
  """Greedy answers (decoded, special tokens skipped, stripped) of `model` to each prompt, in
  batches of eval.batch_size rows padded to one shape (one compile per run)."""
  bs, width = config.eval.batch_size, max(len(p) for p in prompts)
  eos = tok.eos_token_id
  pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
  texts = []
  for start in range(0, len(prompts), bs):
    chunk = list(prompts[start:start + bs])
    rows = chunk + [chunk[0]] * (bs - len(chunk))  # Fixed shape: one compile.
    tokens = np.full((bs, width), pad, np.int32)
    mask = np.zeros((bs, width), bool)
    for i, p in enumerate(rows):
      tokens[i, :len(p)], mask[i, :len(p)] = p, True
    out, lengths = generate_lib.generate(model, tokens, mask,
                                         max_new_tokens=config.eval.max_new_tokens,
                                         eos_id=eos, pad_id=pad)
    out, lengths = np.asarray(out), np.asarray(lengths)
    for i in range(len(chunk)):
      ids = [t for t in out[i, :lengths[i]].tolist() if t != eos]
      texts.append(tok.decode(ids, skip_special_tokens=True).strip())
  return texts


def test_answers(model, params: dict[str, Any], prompts: Sequence[tuple[list[int], str]],
                 config: ml_collections.ConfigDict, tok, run_dir: pathlib.Path
                 ) -> dict[str, Any]:
  """Greedy answers to the test prompts with each adapter state in `params`, scored against the
  references (`metrics.answer_scores`): {"test_rouge_l_<name>", "test_exact_match_<name>",
  "answers_<name>": the first eval.n_examples (reference, answer) pairs}. Every answer is
  written to run_dir/answers_<name>.jsonl."""
  out: dict[str, Any] = {}
  refs = [r for _, r in prompts]
  for name, p in params.items():
    nnx.update(model, p)
    answers = generate_texts(model, [ids for ids, _ in prompts], config, tok)
    scores = metrics.answer_scores(answers, refs)
    out[f"test_rouge_l_{name}"] = scores["rouge_l"]
    out[f"test_exact_match_{name}"] = scores["exact_match"]
    rows = [{"reference": r, "answer": a, "rouge_l": metrics.rouge_l(a, r)}
            for r, a in zip(refs, answers)]
    out[f"answers_{name}"] = rows[:config.eval.n_examples]
    if distributed.is_main():
      io.write_text_atomic(run_dir / f"answers_{name}.jsonl",
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return out


def load_own_oracle(config: ml_collections.ConfigDict, own: OwnData, tok) -> list:
  """data.oracle's records (data.pool_format) as `PoolDocument`s, their encoded examples added
  to own.pool_by_id; records cut away by max_len or already in the pool are left out."""
  d = config.data
  f = splits.fields(d)
  recs = files.read_all(d.oracle, fields=formats.required_fields(d.pool_format, f),
                        text_field=f.text, id_field=d.id_field, what="data.oracle")
  enc, _ = formats.encode_records(recs, tok, d.max_len, d.pool_format, f)
  by_id = {e["id"]: e for e in enc}
  docs = []
  for r in recs:
    if r.id in by_id and r.id not in own.pool_by_id:
      text = formats.record_text(r, d.pool_format, f)
      docs.append(PoolDocument(id=r.id, text=text, source=r.file, manifest_fields={
          "uid": r.uid, "file": r.file, "row": r.row, "text": text}))
      own.pool_by_id[r.id] = by_id[r.id]
  return docs


def export_adapters(model, config: ml_collections.ConfigDict, run_dir: pathlib.Path,
                    adapters: dict[str, Any], tok) -> None:
  """With a Hugging Face backbone (model.pretrained, not GGUF): each adapter state is written
  as a PEFT adapter in run_dir/<name>/ (`peft_io.export_peft`), and with model.export_merged
  also merged into the base weights in run_dir/<name>_merged/ (Hugging Face layout)."""
  pretrained = config.model.pretrained
  if not pretrained or pretrained.endswith(".gguf") or not distributed.is_main():
    return
  for name, params in adapters.items():
    nnx.update(model, params)
    peft_io.export_peft(model, run_dir / name, str(pathlib.Path(pretrained).expanduser()))
    if config.model.get("export_merged", False):
      peft_io.export_merged(model, tok, run_dir / f"{name}_merged")


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs the whole experiment described by a validated config; returns the results."""
  t0 = time.perf_counter()
  cache = config_lib.cache_dir(config)
  if not jax.config.jax_compilation_cache_dir:  # Reruns skip XLA compilation.
    jax.config.update("jax_compilation_cache_dir", str(cache / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  mesh = distributed.make_mesh(config.mesh.model)
  check_batch_sizes(config, mesh.shape["data"])
  arms, seeds = config_lib.arm_list(config), config_lib.seed_list(config)
  if config.data.task == "dictd":
    paths = dictd.prepare(config, cache)
    log(f"data: dictd task ({config.dictd.target}) in {paths['adapt'].parent}")

  own = None
  if own_data(config):
    check_own_config(config)
    log(f"data: reading your task (data.adapt={config.data.adapt}) and pool")
    task, own_recs, pool_recs = load_own_task(config)
    pretrain_pool = task.pool
  else:
    log(f"data: loading {config.data.source} corpus")
    docs = load_corpus(config, cache)
    task = sources.make_task(docs, config.data.domain, config.data.n_adapt,
                             config.data.n_heldout, config.seed)
    config_lib.check_select_k(config, len(task.pool))
    pretrain_pool = task.pool
    if config.data.backbone_keep < 1.0:
      pretrain_pool = tweets.thin_domain(task.pool, config.data.domain,
                                         config.data.backbone_keep, config.seed)
    log(f"data: {len(task.adapt)} adaptation / {len(task.heldout)} held-out documents of "
        f"{config.data.domain!r}; backbone pool {len(task.pool)} documents "
        f"({len(pretrain_pool)} used for pretraining)")
  workdir = config_lib.prepare_workdir(config)
  distributed.barrier("jbat-workdir")
  log(f"workdir: {workdir}" + (f" ({jax.process_count()} processes, {jax.device_count()} devices)"
                               if jax.process_count() > 1 else ""))

  base, tok, folder, cached = get_backbone(config, pretrain_pool, cache, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
  how = ("loaded from a Hugging Face folder" if config.model.pretrained else
         "loaded from cache" if cached else "pretrained")
  log(f"backbone: {n_params:,} parameters, {how} ({folder})")

  if own_data(config):
    task, own = encode_own_task(config, task, own_recs, pool_recs, tok)
    if config.data.oracle:
      own.oracle = load_own_oracle(config, own, tok)
      log(f"data: {len(own.oracle)} oracle examples (data.oracle)")
    if config.eval.generate:
      own.prompts = generation_prompts(own_recs.test, config, tok)
    c = own.counts
    log(f"data: adapt {c['adapt']['kept']} / valid {c['valid']['kept']} / test "
        f"{c['test']['kept']} examples (cut by data.max_len: {c['adapt']['cut_by_max_len']} / "
        f"{c['valid']['cut_by_max_len']} / {c['test']['cut_by_max_len']}); pool "
        f"{c['pool']['kept']} of {c['pool']['read']} records")
    if any(a != "none" for a in arms) and config.select.k > len(task.pool):
      raise JbatError(f"config: select.k={config.select.k} is larger than the pool "
                      f"({len(task.pool)} usable records of data.pool); lower select.k")
  if config.stop_after == "select":
    return stop_after_select(config, arms, task, base, tok, workdir, mesh, own=own)
  if own is None:
    adapt = pipeline.encode(task.adapt, tok, config.data.max_len)
    heldout = pipeline.encode(task.heldout, tok, config.data.max_len)
  else:
    adapt, heldout = own.adapt, own.valid
  results: dict[str, Any] = {}
  diverged: dict[str, dict[str, Any]] = {}  # Arms stopped by a divergence (see Diverged).
  for arm in arms:
    try:
      results[arm] = run_arm(arm, seeds, config, task, base, tok, adapt, heldout, workdir, mesh,
                             own=own)
    except Diverged as e:
      diverged[arm], hint = diverged_record(e, arm), e.hint()
      log(e.short())

  summary = {
      "config": config.name, "domain": config.data.domain, "default_score": config.select.score,
      "seeds": seeds, "arms": results, "backbone_params": n_params, "backbone_cached": cached,
      "backbone_dir": str(folder), "n_adapt": len(task.adapt), "n_heldout": len(task.heldout),
      "n_pool": len(task.pool), "n_pretrain_pool": len(pretrain_pool),
      "adapter_params": lora_param_count(base, config), "select": config.select.to_dict(),
      "bat": config.bat.to_dict(), "lm_config": dataclasses.asdict(base.cfg)}
  if own is not None:
    summary.update(own_summary(config, own, results))
    summary["task_stats"] = report.task_stats(results)
  if diverged:
    summary["diverged"] = diverged
  summary["stats"] = report.paired_stats(results)
  summary["seconds"] = time.perf_counter() - t0
  if distributed.is_main():
    io.write_json_atomic(workdir / layout.RESULTS_FILE, summary, finite=True)
    report.write_report(workdir, summary)
    if own is not None:
      path = workdir / layout.REPORT_FILE
      io.write_text_atomic(path, path.read_text() + protocol_report(summary))
  log(f"report: {workdir / layout.REPORT_FILE}")
  if diverged:  # The other arms are reported; the run still fails (exit 2).
    raise JbatError("; ".join(d["summary"] for d in diverged.values()) + f"; {hint}. "
                    "results.json and report.md hold the arms that finished")
  return summary


def run_arm(arm: str, seeds: Sequence[int], config: ml_collections.ConfigDict,
            task: sources.Task, base, tok, adapt, heldout, workdir: pathlib.Path,
            mesh, own: OwnData | None = None) -> dict[str, Any]:
  """Selects an arm's backbone documents and trains its adapters (one per seed); returns the
  arm's entry of results.json. Raises Diverged naming the arm (and seed) at the first seed
  that diverges: an arm is reported whole or not at all, and its later seeds are not run
  (they share the learning rate)."""
  try:
    chosen, facts = select_arm_docs(arm, config, task, base, tok, workdir, mesh, own=own)
  except Diverged as e:  # The surrogate (stage 1) of a selecting arm.
    raise e.within(f"arm {arm}", "train.lr", stage="surrogate training") from None
  if arm != "none":
    log(f"arm {arm}: {len(chosen)} backbone documents selected"
        + (f", precision {facts['precision']:.2f}" if facts["precision"] is not None else ""))
  if own is not None:
    selected = [own.pool_by_id[d.id] for d in chosen]
  else:
    selected = pipeline.encode(chosen, tok, config.data.max_len) if chosen else []
  reselect = make_reselector(arm, config, task, base, tok, workdir, mesh, own=own)
  runs = []
  for seed in seeds:
    try:
      r = train_one(arm, seed, base, config, adapt, heldout, selected, tok, workdir, mesh,
                    reselect=reselect, own=own)
    except Diverged as e:  # Raised before adapter.safetensors is written.
      stage = "adapter training" if e.stage.startswith("adapt [") else e.stage  # or reselection
      raise e.within(f"arm {arm} seed {seed}", "train.lr", seed=seed, stage=stage) from None
    log(f"arm {arm} seed {seed}: held-out NLL backbone {r['backbone_nll']:.4f} -> best "
        f"{r['best_nll']:.4f} (step {r['best_step']}), final {r['final_nll']:.4f}")
    runs.append(r)
  out = {
      "best_nll": [r["best_nll"] for r in runs], "final_nll": [r["final_nll"] for r in runs],
      "best_step": [r["best_step"] for r in runs],
      "backbone_nll": runs[0]["backbone_nll"], "steps": runs[0]["steps"],
      "train_seconds": [r["train_seconds"] for r in runs],
      "curves": [r["curve"] for r in runs], **facts}
  if any(r.get("reselections") for r in runs):
    out["reselections"] = [r["reselections"] for r in runs]
  for key in ("test_nll_backbone", "test_nll_best", "test_nll_final", "test_rouge_l_best",
              "test_rouge_l_final", "test_exact_match_best", "test_exact_match_final"):
    if key in runs[0]:
      out[key] = [r[key] for r in runs]
  for key in ("answers_best", "answers_final"):
    if key in runs[0]:
      out[key] = runs[0][key]  # The first seed's, for report.md.
  return out


def own_summary(config: ml_collections.ConfigDict, own: OwnData,
                results: dict[str, Any]) -> dict[str, Any]:
  """results.json's facts of the user's path: the sources, the example counts, and which
  split chose what (the protocol)."""
  d = config.data
  return {
      "domain": "data.adapt", "n_adapt": len(own.adapt), "n_heldout": len(own.valid),
      "n_valid": len(own.valid), "n_test": len(own.test), "counts": own.counts,
      "sources": {k: d[k] for k in ("adapt", "valid", "test", "pool", "format", "pool_format")},
      "protocol": {
          "best_step_chosen_on": "valid",
          "best_nll": "valid NLL at the best valid step",
          "final_nll": "valid NLL at the final step",
          "test_nll_best": "test NLL at the best valid step (the reported number)",
          "test_nll_final": "test NLL at the final step",
          "test_used_for": "reporting only (evaluated after training, never during it)"}}


def protocol_report(summary: dict[str, Any]) -> str:
  """report.md's section on the user's path: which split chose what, and the test NLLs."""
  c = summary["counts"]
  lines = ["", "## Protocol (your data)", "",
           f"Every arm chose its best step on the **validation** split (data.valid, "
           f"{summary['n_valid']} examples): `best_nll` / `best_step` above are validation "
           f"numbers. The **test** split (data.test, {summary['n_test']} examples) chose "
           "nothing: it was evaluated once per arm and seed after training, at the best "
           "validation step and at the final step.", "",
           "Examples cut by data.max_len (response cut away): "
           + ", ".join(f"{k} {c[k]['cut_by_max_len']} of {c[k]['read']}"
                       for k in ("adapt", "valid", "test", "pool")) + ".", ""]
  if summary["n_test"]:
    lines += ["| arm | test NLL at best valid step | test NLL final | test NLL backbone |",
              "|---|---|---|---|"]
    for name, a in summary["arms"].items():
      if "test_nll_best" in a:
        lines.append(f"| {name} | {report.mean_sd(a['test_nll_best'])} | "
                     f"{report.mean_sd(a['test_nll_final'])} | "
                     f"{report.mean_sd(a['test_nll_backbone'])} |")
    lines.append("")
    lines += ["Test metrics at the best validation step (response NLL in nats/token, lower is "
              "better; ROUGE-L F and exact match of greedy answers, higher is better); mean ± "
              "sd over seeds, differences paired by seed with 95% t-intervals:", "",
              report.task_table(summary, "best"), ""]
    if any("test_rouge_l_final" in a for a in summary["arms"].values()):
      lines += ["At the final step:", "", report.task_table(summary, "final"), ""]
    samples = report.answer_samples(summary, "best")
    if samples:
      lines += ["Generated answers at the best validation step (seed "
                f"{summary['seeds'][0]}, greedy) beside the reference:", "", samples]
  return "\n".join(lines)


def diverged_record(e: Diverged, arm: str) -> dict[str, Any]:
  """results.json's entry for an arm stopped by a divergence (no numbers that are not finite)."""
  return {"arm": arm, "seed": e.seed, "stage": e.stage, "step": e.step, "summary": e.short(),
          "message": str(e)}


def stop_after_select(config: ml_collections.ConfigDict, arms: list[str], task: sources.Task,
                      base: CausalLM, tok, workdir: pathlib.Path, mesh,
                      own: OwnData | None = None) -> dict[str, Any]:
  """`stop_after = "select"`: the selections of the selecting arms (albat, score names), no
  adapter training. Returns {arm: facts}; the manifests are under workdir/select/<score>/."""
  out = {}
  for arm in arms:
    score = registry.score_for(arm, config)
    if score is None:
      continue
    try:
      _, facts = select_arm_docs(arm, config, task, base, tok, workdir, mesh, own=own)
    except Diverged as e:
      raise e.within(f"arm {arm}", "train.lr", stage="surrogate training") from None
    log(f"arm {arm}: {facts['n_selected']} documents selected -> "
        f"{layout.manifest(layout.select_dir(workdir, score))}")
    out[arm] = facts
  return out


def lora_param_count(base: CausalLM, config: ml_collections.ConfigDict) -> int:
  model = nnx.clone(base)
  lora.apply_lora(model, lora_config(config), rngs=nnx.Rngs(0))
  return lora.count_params(model)["adapter"]
