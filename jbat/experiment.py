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
per draw seed (`config.draw_seeds`, default `config.seed`) and shared by all training seeds.
With `bat.reselect_every` the model-score arms select again around each seed's adapter every
that many steps (`make_reselector`), and the oracle re-draws at the same steps (matched: as many
distinct documents as albat).

Protocol (`jbat.protocol`, docs/method.md): every task has adaptation, validation (`heldout`
below: chooses the best step) and test splits; the test split is sealed until each adapter's
training has ended. `config.split_seeds` repeats the whole experiment over target splits (on a
labelled corpus one backbone serves them all, pretrained without any split's target documents:
`shared_pretrain_pool`), `config.draw_seeds` over draws; results are paired by (split, draw,
seed).
`stop_after = "select"` stops at the first split's selections.
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

from jbat import albat, backbone, distributed, io, layout, lora, metrics, protocol, registry
from jbat import report, results_doc, selection
from jbat import config as config_lib
from jbat import peft_io
from jbat.data import dictd, files, formats, mixture, neardup, pipeline, pool_stream, sources
from jbat.data import splits
from jbat.data import tokenizer as tokenizer_lib, tweets
from jbat.errors import Diverged, JbatError
from jbat.models import generate as generate_lib
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.models.hf_io import load_causal_lm
from jbat.scoring import stream
from jbat.training import loop


PoolDocument = pool_stream.PoolDocument


@dataclasses.dataclass
class OwnData:
  """The user's task (data.adapt and friends), encoded in data.format / data.pool_format.

  adapt / valid / test: encoded task examples (response-only loss weights); pool: the pool
  files, streamed (`pool_stream.FilePool`; None without data.pool): nothing holds the whole
  pool, selections are re-read by location (`examples`); counts: what was read, cut by
  max_len, dropped (reported)."""

  adapt: list
  valid: list
  test: list
  pool: pool_stream.FilePool | None
  counts: dict
  oracle: list = dataclasses.field(default_factory=list)  # data.oracle's PoolDocuments.
  prompts: list = dataclasses.field(default_factory=list)  # Test (prompt ids, reference).
  extra: dict = dataclasses.field(default_factory=dict)  # id -> encoded data.oracle example.

  def examples(self, docs: Sequence[sources.Document]) -> list[dict]:
    """The encoded examples of selected documents, in their order: pool documents
    (`PoolDocument`s) read again from the files by (file, row), data.oracle's from `extra`."""
    if not docs:
      return []
    pooled = [d for d in docs if d.id not in self.extra]
    got = {}
    if pooled:
      index = {f: i for i, f in enumerate(self.pool.files)}
      got = {ex["id"]: pool_stream.training_example(ex) for ex in self.pool.read(
          [(index[d.manifest_fields["file"]], d.manifest_fields["row"]) for d in pooled])}
    return [self.extra[d.id] if d.id in self.extra else got[d.id]
            for d in docs if d.id in self.extra or d.id in got]


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
                  ) -> tuple[sources.Task, splits.TaskRecords]:
  """The user's task as a `sources.Task` (heldout = the validation split; pool empty: the
  pool is streamed from its files, `encode_own_task`) plus its records."""
  d = config.data
  f = splits.fields(d)
  recs = splits.load_task(d, config.seed)
  task = sources.Task(adapt=[_task_doc(r, d.format, f) for r in recs.adapt],
                      heldout=[_task_doc(r, d.format, f) for r in recs.valid], pool=[])
  return task, recs


def pool_documents(config: ml_collections.ConfigDict) -> list[sources.Document]:
  """Every pool record as a document, in memory: only to pretrain a backbone on the pool
  (no model.pretrained), which reads all of it anyway."""
  d = config.data
  f = splits.fields(d)
  return [_task_doc(r, d.pool_format, f) for r in splits.pool_reader(d)] if d.pool else []


def encode_own_task(config: ml_collections.ConfigDict, task: sources.Task,
                    recs: splits.TaskRecords, tok, near_dup: neardup.Index | None = None
                    ) -> tuple[sources.Task, OwnData]:
  """Encodes the user's task with the model's tokenizer and opens the pool as a streamed
  `pool_stream.FilePool` (read a chunk at a time; pool records that are near-duplicates of a
  task example (`near_dup`), whose text equals one's, repeated ids, and records cut away by
  max_len are left out as it streams)."""
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
  pool = None
  if d.pool:
    task_texts = [doc.text for doc in (*task.adapt, *task.heldout)]
    task_texts += [formats.record_text(r, d.format, f) for r in recs.test]
    pool = pool_stream.FilePool(d.pool, fmt=d.pool_format, fields=f, id_field=d.id_field,
                                tokenizer=tok, max_len=max_len, task_texts=task_texts,
                                near_dup=near_dup)
    counts["pool"] = {"files": len(pool.files), "empty_files": len(pool.empty_files)}
  own = OwnData(adapt=enc["adapt"], valid=enc["valid"], test=enc["test"], pool=pool,
                counts=counts)
  return task, own


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
                 remat=m.remat, vocab_chunk=config_lib.vocab_chunk(config, vocab_size),
                 grad_rows=config_lib.grad_rows(config, vocab_size))
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
  if config.select.less_batch_size:
    sizes["select.less_batch_size"] = config.select.less_batch_size
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
    path = config_lib.pretrained_path(config)
    log(f"backbone: loading Hugging Face model {path}")
    base, tok = load_causal_lm(path, dtype=config.model.dtype, mesh=mesh)
    v = base.cfg.vocab_size
    base.cfg = dataclasses.replace(base.cfg, remat=config.model.remat,
                                   vocab_chunk=config_lib.vocab_chunk(config, v),
                                   grad_rows=config_lib.grad_rows(config, v))
    if config.data.max_len > base.cfg.max_len:
      raise JbatError(f"config: data.max_len={config.data.max_len} exceeds the model's "
                      f"max_position_embeddings ({base.cfg.max_len})")
    return base, tok, path, True
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
                        log_every=t.log_every, seed=seed, grad_accum=t.grad_accum,
                        patience=int(t.get("patience", 0)))


def lora_config(config: ml_collections.ConfigDict) -> lora.LoRAConfig:
  return lora.LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha,
                         targets=config.lora.targets, dora=bool(config.lora.get("dora", False)))


def select_arm_docs(arm: str, config: ml_collections.ConfigDict, task: sources.Task, base,
                    tok, workdir: pathlib.Path, mesh, own: OwnData | None = None,
                    draw: int | None = None) -> tuple[list[sources.Document], dict]:
  """The backbone documents an arm trains on, and facts about the selection (`own`: the
  user's encoded examples, see `albat_docs`). `draw` (default config.seed) seeds the random and
  oracle draws and the selection's surrogate and rule."""
  draw = config.seed if draw is None else draw
  k = registry.pool_k(config.select.k, len(task.pool) if own is None else config.select.k)
  t0 = time.perf_counter()
  if arm == "none":
    return [], {}
  if arm == "random" and own is not None:
    chosen = random_pool_docs(own.pool, k, draw + 1)
  elif arm == "random":
    rng = np.random.default_rng(draw + 1)
    chosen = [task.pool[i] for i in sorted(rng.choice(len(task.pool), size=k, replace=False))]
  elif arm == "oracle":
    in_domain = (own.oracle if own is not None else
                 [d for d in task.pool if d.label == config.data.domain])
    if not in_domain:
      raise JbatError("arm oracle: data.oracle has no usable record" if own is not None else
                      f"arm oracle: the pool has no documents labelled {config.data.domain!r}")
    rng = np.random.default_rng(draw + 2)
    idx = rng.choice(len(in_domain), size=min(k, len(in_domain)), replace=False)
    chosen = [in_domain[i] for i in sorted(idx)]
  else:
    score = registry.score_for(arm, config)
    chosen = albat_docs(config, task, base, tok, score, layout.select_dir(workdir, score), mesh,
                        seed=draw, own=own)
  facts = {"n_selected": len(chosen), "select_seconds": time.perf_counter() - t0,
           **label_facts(chosen, target_label(config))}
  return chosen, facts


def random_pool_docs(pool: pool_stream.FilePool, k: int, seed: int
                     ) -> list[sources.Document]:
  """The random arm on a streamed pool: k usable records drawn uniformly from the per-file row
  counts (`FilePool.sample`), without reading the whole pool. JbatError when fewer than k
  are usable."""
  got = pool.sample(k, seed)
  if len(got) < k:
    raise JbatError(f"config: select.k={k} is larger than the pool ({len(got)} usable records "
                    "of data.pool); lower select.k")
  return [pool_stream.document(ex) for ex in got]


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
               init_adapter=None, own: OwnData | None = None,
               candidates: list[dict] | None = None) -> list[sources.Document]:
  """The pool documents `albat.select_backbone_data` selects by `score` with the config's rule
  (surrogate from a fresh adapter, or from `init_adapter` for a re-selection; `seed` also
  seeds the rule unless `select_seed` is given). With `own`, the surrogate and the scores use
  the user's encoded examples (response-only loss weights) instead of `pipeline.encode`, and
  the pool is streamed from its files (`own.pool`) unless `candidates` (encoded examples
  parallel to task.pool, a re-selection's candidates) are given."""
  sur_spec = train_spec(config, seed, steps=config.surrogate.steps)
  sur_spec = dataclasses.replace(sur_spec, eval_every=0, ckpt_every=config.surrogate.steps)
  n_pool = len(task.pool) if own is None or candidates is not None else config.select.k
  spec = selection.SelectSpec.from_config(config, n_pool, score=score,
                                          seed=seed if select_seed is None else select_seed)
  manifest = albat.select_backbone_data(
      base, lora_config(config), task, tok, spec, surrogate_spec=sur_spec,
      max_len=config.data.max_len, seed=seed, workdir=folder, mesh=mesh,
      progress=config.progress, init_adapter=init_adapter,
      score_cache=config_lib.cache_dir(config) / "scores",
      surrogate_cache=config_lib.cache_dir(config) / "surrogates",
      adapt_examples=None if own is None else own.adapt,
      pool_examples=(None if own is None else own.pool if candidates is None else candidates))
  io.release_host_memory()  # The scoring's host buffers, before an adapter trains.
  if own is not None:
    if candidates is None and own.pool is not None:  # The usable pool rows it scored.
      n_scored = json.loads(layout.summary(folder).read_text()).get("n_pool")
      own.counts.setdefault("pool", {})["usable"] = n_scored
      own.counts["pool"].update(stream.pool_counts(layout.scores_dir(folder)) or {})
    return [PoolDocument(id=r["id"], text=r["text"], source=r["source"], manifest_fields={
        k: r[k] for k in ("uid", "file", "row", "text")}) for r in io.read_jsonl(manifest)]
  by_id = {d.id: d for d in task.pool}
  return [by_id[r["id"]] for r in io.read_jsonl(manifest)]


# (seed, step, adapter or None, folder) -> the re-selected documents.
Reselector = Callable[[int, int, Any, pathlib.Path], list[sources.Document]]


def make_reselector(arm: str, config: ml_collections.ConfigDict, task: sources.Task, base, tok,
                    workdir: pathlib.Path, mesh, own: OwnData | None = None,
                    draw: int | None = None, matched: dict | None = None,
                    first: Sequence[sources.Document] = ()) -> Reselector | None:
  """Re-selection around the current adapter for a model-score arm (None: the arm does not
  re-select, or bat.reselect_every = 0). The candidates are the top bat.reselect_top documents
  of the arm's first ranking (all of the pool for 0); the adapter may be None only when the
  folder already holds that re-selection. With bat.reselect_from = "init" (a control) the
  stage-1 surrogate is used again instead of the adapter: the same ranking, a new sample.
  The rule's seed of a re-selection is derived from (training seed, step).

  The oracle arm re-draws (`oracle_redrawer`) when `matched` holds the re-selections of the
  arm it is matched to."""
  draw = config.seed if draw is None else draw
  if arm == "oracle":
    return oracle_redrawer(config, task, draw, matched, first) if matched else None
  score = registry.score_for(arm, config)
  if not config.bat.reselect_every or not registry.arm_reselects(arm, config):
    return None  # No selection, nothing about the adapter to re-score around, or a peer.
  pool, cand_examples = task.pool, None
  if own is not None and config.bat.reselect_top:  # The candidates, read again by location.
    cand_examples = albat.top_pool_examples(layout.select_dir(workdir, score), score,
                                            config.bat.reselect_top, own.pool)
    pool = [pool_stream.document(ex) for ex in cand_examples]
    cand_examples = [pool_stream.training_example(ex) for ex in cand_examples]
  elif config.bat.reselect_top:
    keep = set(albat.top_pool_ids(layout.select_dir(workdir, score), score,
                                  config.bat.reselect_top))
    pool = [d for d in task.pool if d.id in keep]
  candidates = dataclasses.replace(task, pool=pool)
  n_candidates = len(pool) if own is None or cand_examples is not None else "all pool"

  from_adapter = config.bat.reselect_from == "adapter"

  def reselect(seed: int, step: int, adapter, folder: pathlib.Path) -> list[sources.Document]:
    if from_adapter and adapter is None and not layout.selection_done(folder):
      raise JbatError(f"re-selection at step {step}: {folder} holds no selection and no adapter "
                      f"was given")
    log(f"arm {arm} seed {seed}: re-selecting around "
        f"{'the adapter' if from_adapter else 'the stage-1 surrogate'} at step {step} "
        f"({n_candidates} candidates)")
    select_seed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    if not from_adapter:  # The stage-1 surrogate again (its seed), a new sample.
      docs = albat_docs(config, candidates, base, tok, score, folder, mesh, seed=draw,
                        select_seed=select_seed, own=own, candidates=cand_examples)
    else:
      docs = albat_docs(config, candidates, base, tok, score, folder, mesh, seed=seed,
                        select_seed=select_seed, init_adapter=adapter, own=own,
                        candidates=cand_examples)
    release_compiled(base)
    return docs

  return reselect


def matched_arm(config: ml_collections.ConfigDict, arms: Sequence[str]) -> str | None:
  """The arm the oracle's re-draws match: albat, else the first arm that re-selects (None when
  no arm re-selects)."""
  if not config.bat.reselect_every:
    return None
  for arm in sorted(arms, key=lambda a: a != "albat"):
    if registry.arm_reselects(arm, config):
      return arm
  return None


def oracle_redrawer(config: ml_collections.ConfigDict, task: sources.Task, draw: int,
                    matched: dict[int, list[dict]], first: Sequence[sources.Document]
                    ) -> Reselector:
  """The matched oracle's re-draws: at each step where the matched arm re-selected (for the
  same training seed), the oracle keeps as many of its previous documents as that re-selection
  kept of its own (`overlap` x its size) and draws the rest anew among the target's pool
  documents it has not used yet, so both arms see the same number of distinct documents (as
  far as the target's pool allows). `first`: the oracle's stage-1 draw. Seeded by (draw,
  training seed, step)."""
  in_domain = [d for d in task.pool if d.label == config.data.domain]
  state: dict[int, tuple[list[sources.Document], set]] = {}

  def redraw(seed: int, step: int, adapter, folder) -> list[sources.Document]:
    del adapter, folder
    previous, used = state.setdefault(seed, (list(first), {d.id for d in first}))
    target = next((r for r in matched.get(seed, []) if r["step"] == step), None)
    n = len(previous)
    n_keep = n if target is None else int(round(target["overlap"] * n))
    rng = np.random.default_rng(np.random.SeedSequence([draw, seed, step, 2]))
    keep = [previous[i] for i in sorted(rng.choice(n, size=n_keep, replace=False))]
    fresh = [d for d in in_domain if d.id not in used]
    if len(fresh) < n - n_keep:  # The target's pool is used up: reuse the oldest ones.
      fresh += [d for d in in_domain if d.id in used and d not in keep]
    new = [fresh[i] for i in sorted(rng.choice(len(fresh), size=n - n_keep, replace=False))]
    chosen = sorted(keep + new, key=lambda d: d.id)
    state[seed] = (chosen, used | {d.id for d in new})
    log(f"arm oracle seed {seed}: re-drew {len(new)} of {n} target documents at step {step} "
        "(matched re-selection)")
    return chosen

  return redraw


def phase_ends(steps: int, every: int) -> list[int]:
  """Last step of each re-selection phase: every, 2 every, ..., steps ([steps] for every 0)."""
  if not every or every >= steps:
    return [steps]
  return list(range(every, steps, every)) + [steps]


def train_one(arm: str, seed: int, base: CausalLM, config: ml_collections.ConfigDict,
              adapt, heldout, selected, tok, workdir: pathlib.Path, mesh,
              reselect: Reselector | None = None, own: OwnData | None = None,
              test: protocol.Sealed | None = None) -> dict[str, Any]:
  """Trains a fresh adapter (init and data order from `seed`); returns its summary.

  `heldout` (the validation split) chooses the best step (fit's evaluations). The test split
  `test` is evaluated once the training ends, never during it: at the backbone (step 0), at the
  best validation step (the best adapter fit kept) and at the final step. With `own` (the
  user's path) and a Hugging Face backbone the final and best adapters are also written in PEFT
  format. `distinct_docs` counts the backbone documents the adapter saw over all phases.

  With `reselect`, training runs in phases of bat.reselect_every steps (one schedule over all
  of them); after each phase but the last the backbone documents are selected again around the
  adapter as it is, under <run>/reselect/step_<t>/. A resumed run skips the phases whose next
  selection is already on disk.
  """
  model = nnx.clone(base)
  lora.apply_lora(model, lora_config(config), rngs=nnx.Rngs(seed))
  init_params = nnx.state(model, nnx.LoRAParam)
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
  seen = set(previous)
  for phase, end in enumerate(ends):
    if phase:
      chosen = reselect(seed, ends[phase - 1], params, folders[phase - 1])
      selected = (pipeline.encode(chosen, tok, config.data.max_len) if own is None
                  else own.examples(chosen))
      ids = {d.id for d in chosen}
      reselections.append({"step": ends[phase - 1], "overlap": len(ids & previous) / len(ids),
                           **label_facts(chosen, target_label(config))})
      previous = ids
      seen |= ids
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
    if result.stopped_step is not None:
      break  # Stopped early on validation: no later phase (or re-selection).
  if distributed.is_main():
    io.save_tree(result.params, run_dir / "adapter.safetensors")
  evals = [r for r in result.history if "eval_loss" in r]
  out = {"seed": seed, "backbone_nll": evals[0]["eval_loss"], "best_nll": result.best_loss,
         "best_step": result.best_step, "final_nll": evals[-1]["eval_loss"],
         "steps": max(r["step"] for r in result.history),
         "train_seconds": time.perf_counter() - start, "distinct_docs": len(seen),
         "curve": [(r["step"], r["eval_loss"]) for r in evals],
         "stopped_step": result.stopped_step}
  if reselections:
    out["reselections"] = reselections
  best = result.best_params if result.best_params is not None else result.params
  if test is not None and len(test):
    out.update(test_nlls(model, {"backbone": init_params, "best": best,
                                 "final": result.params}, test, config, tok, mesh))
  if own is not None:
    if config.eval.generate and own.prompts:
      states = {"best": best, "final": result.params}
      out.update(test_answers(model, {k: states[k] for k in eval_states(config)}, own.prompts,
                              config, tok, run_dir))
    if test is not None and len(test) and distributed.is_main():  # Kept if the run stops.
      io.write_json_atomic(run_dir / "test_metrics.json",
                           {k: v for k, v in out.items() if k.startswith("test_")}, finite=True)
    export_adapters(model, config, run_dir, {"peft": result.params, "peft_best": best}, tok)
  return out


def test_nlls(model, params: dict[str, Any], test: protocol.Sealed, config, tok, mesh
              ) -> dict[str, float]:
  """{"test_nll_<name>": mean token NLL of the test examples} for each adapter state in
  `params` (LoRA states of `model`): the one place the sealed test split is opened (once)."""
  n_proc, proc = jax.process_count(), jax.process_index()
  graphdef, _, frozen = nnx.split(model, nnx.LoRAParam, ...)
  with test.open() as examples:
    evaluate = loop.make_eval_fn(
        graphdef, distributed.place_params(frozen, mesh),
        lambda: pipeline.eval_batches(examples, config.train.eval_batch_size // n_proc,
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
  """data.oracle's records (data.pool_format) as `PoolDocument`s, their encoded examples kept in
  own.extra; records cut away by max_len are left out."""
  d = config.data
  f = splits.fields(d)
  recs = files.read_all(d.oracle, fields=formats.required_fields(d.pool_format, f),
                        text_field=f.text, id_field=d.id_field, what="data.oracle")
  enc, _ = formats.encode_records(recs, tok, d.max_len, d.pool_format, f)
  by_id = {e["id"]: e for e in enc}
  docs = []
  for r in recs:
    if r.id in by_id and r.id not in own.extra:
      text = formats.record_text(r, d.pool_format, f)
      docs.append(PoolDocument(id=r.id, text=text, source=r.file, manifest_fields={
          "uid": r.uid, "file": r.file, "row": r.row, "text": text}))
      own.extra[r.id] = by_id[r.id]
  return docs


def export_adapters(model, config: ml_collections.ConfigDict, run_dir: pathlib.Path,
                    adapters: dict[str, Any], tok) -> None:
  """With a Hugging Face backbone (model.pretrained, not GGUF): each adapter state is written
  as a PEFT adapter in run_dir/<name>/ (`peft_io.export_peft`), and with model.export_merged
  also merged into the base weights in run_dir/<name>_merged/ (Hugging Face layout)."""
  pretrained = config.model.pretrained
  if not pretrained or pretrained.endswith(".gguf") or not distributed.is_main():
    return
  pretrained = str(config_lib.pretrained_path(config))
  for name, params in adapters.items():
    nnx.update(model, params)
    peft_io.export_peft(model, run_dir / name, pretrained)
    if config.model.get("export_merged", False):
      peft_io.export_merged(model, tok, run_dir / f"{name}_merged")


@dataclasses.dataclass
class Replicate:
  """One target split, loaded and encoded: the task (heldout = validation), the sealed test
  split, the backbone and what the report says about them."""

  split: int
  task: sources.Task
  adapt: list
  valid: list
  test: protocol.Sealed
  base: CausalLM
  tok: Any
  own: OwnData | None
  facts: dict[str, Any]


def with_seed(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """A copy of `config` with `seed` replaced (the split seed of the user's count splits)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = seed
  return c


def shared_pretrain_pool(config: ml_collections.ConfigDict, docs: Sequence[sources.Document],
                         split_seeds: Sequence[int]) -> list[sources.Document]:
  """Labelled corpus, several target splits: the one backbone pretraining pool they share.

  It is the pool of the first split without any document that some split uses for
  adaptation, validation or test, thinned to data.backbone_keep (seed: the first split
  seed), and without near-duplicates (data.near_dup) of those documents. So no split's
  backbone has seen its own evaluation documents, and the splits differ only in the target
  documents and the pool (which still holds the other splits' documents) rather than in a
  freshly pretrained backbone each."""
  n_valid, n_test = config_lib.heldout_split(config)
  used: dict[str, str] = {}
  pool: list[sources.Document] = []
  for i, split in enumerate(split_seeds):
    task, test_docs = sources.split_task(docs, config.data.domain, config.data.n_adapt, n_valid,
                                         n_test, split)
    used.update((d.id, d.text) for d in (*task.adapt, *task.heldout, *test_docs))
    if i == 0:
      pool = task.pool
  pool = [d for d in pool if d.id not in used]
  if config.data.backbone_keep < 1.0:
    pool = tweets.thin_domain(pool, config.data.domain, config.data.backbone_keep,
                              split_seeds[0])
  keep, _ = drop_near_duplicates(config, pool, list(used.values()),
                                 what="documents of the shared backbone's pretraining pool")
  pool = [d for d, k in zip(pool, keep) if k]
  log(f"data: one backbone for split seeds {list(split_seeds)}, pretrained on {len(pool)} "
      f"documents (none of the {len(used)} target documents any split evaluates or adapts on)")
  return pool


def load_split(config: ml_collections.ConfigDict, split: int, cache: pathlib.Path, mesh,
               prepare: Callable[[], None], shared: dict[str, Any] | None = None) -> Replicate:
  """Loads the task for target-split seed `split` (labelled corpus or the user's files), drops
  the pool's near-duplicates of the target's documents, gets the backbone and encodes the
  splits. `prepare` runs once the data is known to be good (creates the workdir). With more
  than one backbone split seed (config_lib.backbone_split_list), a labelled corpus's splits
  share one backbone (`shared_pretrain_pool`), computed once per run and kept in `shared`."""
  own, own_recs, test_docs = None, None, []
  if own_data(config):
    log(f"data: reading your task (data.adapt={config.data.adapt}) and pool (split {split})")
    task, own_recs = load_own_task(with_seed(config, split))
    pretrain_pool = [] if config.model.pretrained else pool_documents(config)
  else:
    log(f"data: loading {config.data.source} corpus")
    docs = load_corpus(config, cache)
    n_valid, n_test = config_lib.heldout_split(config)
    task, test_docs = sources.split_task(docs, config.data.domain, config.data.n_adapt, n_valid,
                                         n_test, split)
    config_lib.check_select_k(config, len(task.pool))
    pretrain_pool = task.pool
    if config.data.backbone_keep < 1.0:
      pretrain_pool = tweets.thin_domain(task.pool, config.data.domain,
                                         config.data.backbone_keep, split)
    log(f"data: {len(task.adapt)} adaptation / {len(task.heldout)} validation / "
        f"{len(test_docs)} test documents of {config.data.domain!r} (split seed {split}); "
        f"backbone pool {len(task.pool)} documents ({len(pretrain_pool)} used for pretraining)")
  task, index, pretrain_pool, near = filter_near_duplicates(
      config, task, test_docs, own_recs, pretrain_pool)
  if own_recs is None and len(config_lib.backbone_split_list(config)) > 1:
    shared = {} if shared is None else shared
    if "pretrain_pool" not in shared:  # The same for every split: one near-duplicate pass.
      shared["pretrain_pool"] = shared_pretrain_pool(config, docs,
                                                     config_lib.backbone_split_list(config))
    pretrain_pool = shared["pretrain_pool"]
  prepare()
  base, tok, folder, cached = get_backbone(config, pretrain_pool, cache, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
  how = ("loaded from a Hugging Face folder" if config.model.pretrained else
         "loaded from cache" if cached else "pretrained")
  log(f"backbone: {n_params:,} parameters, {how} ({folder})")
  if own_recs is not None:
    task, own = encode_own_task(config, task, own_recs, tok, near_dup=index)
    c = own.counts
    log(f"data: adapt {c['adapt']['kept']} / valid {c['valid']['kept']} / test "
        f"{c['test']['kept']} examples (cut by data.max_len: {c['adapt']['cut_by_max_len']} / "
        f"{c['valid']['cut_by_max_len']} / {c['test']['cut_by_max_len']}); pool: "
        + (f"{c['pool']['files']} files streamed ({c['pool']['empty_files']} empty, skipped)"
           if "pool" in c else "none"))
    if config.data.oracle:
      own.oracle = load_own_oracle(config, own, tok)
      log(f"data: {len(own.oracle)} oracle examples (data.oracle)")
    if config.eval.generate:
      own.prompts = generation_prompts(own_recs.test, config, tok)
    adapt, valid, test = own.adapt, own.valid, protocol.Sealed(own.test)
  else:
    adapt = pipeline.encode(task.adapt, tok, config.data.max_len)
    valid = pipeline.encode(task.heldout, tok, config.data.max_len)
    test = protocol.Sealed(pipeline.encode(test_docs, tok, config.data.max_len))
  facts = {"backbone_params": n_params, "backbone_cached": cached, "backbone_dir": str(folder),
           "n_adapt": len(task.adapt), "n_heldout": len(task.heldout) + len(test),
           "n_valid": len(task.heldout), "n_test": len(test), "n_pool": len(task.pool),
           "n_pretrain_pool": len(pretrain_pool), "near_dup": near}
  return Replicate(split=split, task=task, adapt=adapt, valid=valid, test=test, base=base,
                   tok=tok, own=own, facts=facts)


def near_dup_index(config: ml_collections.ConfigDict, evaluation: Sequence[str]
                   ) -> neardup.Index | None:
  """The near-duplicate index of the evaluation texts (data.near_dup; None when 0: off)."""
  threshold = config.data.near_dup
  return neardup.Index(evaluation, threshold=threshold) if threshold else None


def filter_near_duplicates(config: ml_collections.ConfigDict, task: sources.Task,
                           test_docs: Sequence[sources.Document],
                           own_recs: splits.TaskRecords | None,
                           pretrain_pool: Sequence[sources.Document]):
  """Drops the pool's near-duplicates of the target's adaptation, validation and test
  documents (`drop_near_duplicates`) from the task's pool and the backbone's pretraining pool.
  Returns (task, index, pretrain_pool, facts).

  The labelled corpus's pool is in memory: it is filtered here (index None). The user's pool
  (own path, `own_recs`) is streamed from its files: its records are dropped chunk by chunk as
  they are read, by the returned `neardup.Index` of the evaluation texts (built once; give it
  to `encode_own_task`), and the counts come from the pass that reads it whole
  (`settle_near_facts`); only `pretrain_pool` (the whole pool in memory, when the backbone is
  pretrained on it) is filtered here."""
  evaluation = [d.text for d in (*task.adapt, *task.heldout)]
  if own_recs is not None:
    f = splits.fields(config.data)
    evaluation += [formats.record_text(r, config.data.format, f) for r in own_recs.test]
    index = near_dup_index(config, evaluation)
    keep, pre = drop_near_duplicates(config, pretrain_pool, evaluation, index=index,
                                     what="pool records (backbone pretraining data)")
    pretrain_pool = [d for d, k in zip(pretrain_pool, keep) if k]
    if index is not None:
      log(f"data: pool records that are near-duplicates of the {len(evaluation)} adaptation / "
          f"validation / test examples (character {neardup.NGRAM}-gram Jaccard >= "
          f"{config.data.near_dup}) are dropped as the pool is streamed")
    return task, index, pretrain_pool, streamed_near_facts(
        config, None if config.model.pretrained else pre)
  evaluation += [d.text for d in test_docs]
  keep, near = drop_near_duplicates(config, task.pool, evaluation)
  if near["dropped"]:
    task = dataclasses.replace(task, pool=[d for d, k in zip(task.pool, keep) if k])
    config_lib.check_select_k(config, len(task.pool))
    kept_ids = {d.id for d in task.pool}
    pretrain_pool = [d for d in pretrain_pool if d.id in kept_ids]
  return task, None, pretrain_pool, near


def drop_near_duplicates(config: ml_collections.ConfigDict, pool: Sequence[sources.Document],
                         evaluation: Sequence[str], index: neardup.Index | None = None,
                         what: str = "pool documents") -> tuple[np.ndarray, dict[str, Any]]:
  """(keep mask over `pool`, facts): pool documents that are near-duplicates
  (`jbat.data.neardup`, Jaccard >= data.near_dup) of an evaluation text (adaptation,
  validation, test) are not kept. data.near_dup = 0 keeps everything. `index`: the evaluation
  texts' `neardup.Index` when already built."""
  threshold = config.data.near_dup
  facts = {"threshold": threshold, "n": neardup.NGRAM, "pool_before": len(pool), "dropped": 0}
  if not threshold or not pool:
    return np.ones(len(pool), dtype=bool), facts
  t0 = time.perf_counter()
  index = index or neardup.Index(evaluation, threshold=threshold)
  res = index.find([d.text for d in pool])
  facts.update(dropped=res.dropped, candidate_pairs=res.candidate_pairs,
               seconds=time.perf_counter() - t0)
  log(f"data: {res.dropped} of {len(pool)} {what} dropped as near-duplicates of the "
      f"{len(evaluation)} adaptation / validation / test documents (character "
      f"{neardup.NGRAM}-gram Jaccard >= {threshold}; {facts['seconds']:.1f} s)")
  return ~res.drop, facts


def streamed_near_facts(config: ml_collections.ConfigDict, pretrain: dict[str, Any] | None
                        ) -> dict[str, Any]:
  """results.json's `near_dup` for a streamed pool (the user's data.pool), before the arms:
  the records are dropped as the pool is read, so `dropped` / `pool_before` are known once a
  pass read it whole (`settle_near_facts`). `pretrain`: the facts of the backbone's
  pretraining data (the whole pool, in memory; None when a model was loaded): it drops the
  same records, so its count stands in until then."""
  facts = {"threshold": config.data.near_dup, "n": neardup.NGRAM, "streamed": True,
           "pool_before": None, "dropped": None}
  if pretrain is not None:
    facts.update(pool_before=pretrain["pool_before"], dropped=pretrain["dropped"],
                 counted_on="backbone pretraining data (the whole pool)")
  return facts


def settle_near_facts(rep: "Replicate") -> int | None:
  """After a replicate's arms: a streamed pool's near-duplicate count from the scoring pass
  that read it whole (summed over processes, `stream.pool_counts`), when one did; returns the
  number of pool records dropped (None: no pass read the whole pool)."""
  near = rep.facts["near_dup"]
  pool = rep.own.counts.get("pool", {}) if rep.own is not None else {}
  if near.get("streamed") and "near_duplicate" in pool:
    near.update(dropped=int(pool["near_duplicate"]), pool_before=int(pool["read"]),
                counted_on="the scoring pass over the pool")
  return near["dropped"]


def replicate_dir(workdir: pathlib.Path, split: int, draw: int, single: bool) -> pathlib.Path:
  """Where a (split, draw) replicate's selections and adapters live: the workdir itself for a
  run of one split and one draw (as before split_seeds / draw_seeds), else
  workdir/split_<s>/draw_<d>."""
  return workdir if single else workdir / f"split_{split}" / f"draw_{draw}"


def merge_arms(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One arm's results over replicates: per-pair lists concatenated in replicate order, label
  counts summed, numbers averaged (kept as they are when all equal), other dicts (e.g.
  early_stopping) merged the same way."""
  out: dict[str, Any] = {}
  for key in parts[0]:
    values = [p[key] for p in parts if key in p]
    if isinstance(values[0], list):
      out[key] = [x for v in values for x in v]
    elif isinstance(values[0], dict) and key != "label_counts":
      out[key] = merge_arms(values)
    elif key == "label_counts":
      total: dict[str, int] = {}
      for v in values:
        for label, n in v.items():
          total[label] = total.get(label, 0) + n
      out[key] = dict(sorted(total.items(), key=lambda kv: -kv[1]))
    elif all(v == values[0] for v in values) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      out[key] = values[0]
    else:
      out[key] = float(np.mean(values))
  return out


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs the whole experiment described by a validated config; returns the results.

  For each target split (config.split_seeds) and draw (config.draw_seeds) every arm trains one
  adapter per training seed; results.json's per-seed lists run over the pairs (split, draw,
  seed) in `summary["pairs"]` order, the same for every arm (so differences are paired)."""
  t0 = time.perf_counter()
  # A rerun in a workdir that holds a run (stopped or finished): its wall time counts only
  # this invocation.
  resumed = (config_lib.workdir(config) / layout.CONFIG_FILE).exists()
  cache = config_lib.cache_dir(config)
  if not jax.config.jax_compilation_cache_dir:  # Reruns skip XLA compilation.
    jax.config.update("jax_compilation_cache_dir", str(cache / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  io.release_memory_after_compiles()  # Each compile's host garbage, not stacked under peaks.
  mesh = distributed.make_mesh(config.mesh.model)
  check_batch_sizes(config, mesh.shape["data"])
  arms, seeds = config_lib.arm_list(config), config_lib.seed_list(config)
  split_seeds, draws = config_lib.split_seed_list(config), config_lib.draw_seed_list(config)
  single = len(split_seeds) == 1 and len(draws) == 1
  if config.data.task == "dictd":
    paths = dictd.prepare(config, cache)
    log(f"data: dictd task ({config.dictd.target}) in {paths['adapt'].parent}")
  if own_data(config):
    check_own_config(config)
  holder: dict[str, pathlib.Path] = {}
  shared: dict[str, Any] = {}  # What all splits share (load_split).

  def prepare() -> None:
    if "workdir" not in holder:
      holder["workdir"] = config_lib.prepare_workdir(config)
      distributed.barrier("jbat-workdir")
      log(f"workdir: {holder['workdir']}" + (
          f" ({jax.process_count()} processes, {jax.device_count()} devices)"
          if jax.process_count() > 1 else ""))

  parts: dict[str, list[dict[str, Any]]] = {}
  pairs, first, test_reads, near_dropped, backbones = [], None, 0, [], []
  diverged: dict[str, dict[str, Any]] = {}  # Arms stopped by a divergence (see Diverged).
  hint = ""
  for split in split_seeds:
    rep = load_split(config, split, cache, mesh, prepare, shared)
    workdir = holder["workdir"]
    first = first or rep
    if config.stop_after == "select":
      return stop_after_select(config, arms, rep.task, rep.base, rep.tok, workdir, mesh,
                               own=rep.own)
    for draw in draws:
      rdir = replicate_dir(workdir, split, draw, single)
      if not single:
        log(f"replicate: split seed {split}, draw seed {draw} ({rdir})")
      matched_to = matched_arm(config, arms)
      order = sorted(arms, key=lambda a: (a != matched_to, a == "oracle"))
      done: dict[str, dict[str, Any]] = {}
      for arm in order:
        if arm in diverged:
          continue
        matched = None
        if arm == "oracle" and matched_to in done:
          matched = dict(zip(seeds, done[matched_to].get("reselections", [[]] * len(seeds))))
        try:
          done[arm] = run_arm(arm, seeds, config, rep.task, rep.base, rep.tok, rep.adapt,
                              rep.valid, rdir, mesh, own=rep.own, test=rep.test, draw=draw,
                              matched=matched)
        except Diverged as e:
          diverged[arm], hint = diverged_record(e, arm), e.hint()
          log(e.short())
        release_compiled(rep.base)
      for arm in arms:
        if arm in done:
          parts.setdefault(arm, []).append(done[arm])
      pairs += [[split, draw, seed] for seed in seeds]
    test_reads += rep.test.reads
    near_dropped.append(settle_near_facts(rep))
    backbones.append(rep.facts["backbone_dir"])
  workdir = holder["workdir"]
  results = {arm: merge_arms(parts[arm]) for arm in arms
             if arm in parts and arm not in diverged}
  summary = {
      "config": config.name, "domain": config.data.domain, "default_score": config.select.score,
      "seeds": seeds, "split_seeds": split_seeds, "draw_seeds": draws, "pairs": pairs,
      "arms": results, **first.facts, "test_reads": test_reads,
      "near_dup_dropped_per_split": near_dropped, "backbone_dir_per_split": backbones,
      "adapter_params": lora_param_count(first.base, config), "select": config.select.to_dict(),
      "bat": config.bat.to_dict(), "lm_config": dataclasses.asdict(first.base.cfg),
      "matched_oracle": matched_arm(config, arms) if "oracle" in arms else None,
      "protocol": protocol_facts(), "machine": results_doc.machine()}
  if first.own is not None:
    summary.update(own_summary(config, first.own, results))
    summary["n_pool"] = int(first.own.counts.get("pool", {}).get("usable") or 0)
    summary["task_stats"] = report.task_stats(results)
  if diverged:
    summary["diverged"] = diverged
  summary["stats"] = report.paired_stats(results)
  summary["seconds"] = time.perf_counter() - t0
  summary["resumed"] = resumed
  if distributed.is_main():
    io.write_json_atomic(workdir / layout.RESULTS_FILE, summary, finite=True)
    report.write_report(workdir, summary)
    path = workdir / layout.REPORT_FILE
    io.write_text_atomic(path, path.read_text() + protocol_report(summary))
    if config.train.get("patience", 0):
      io.write_text_atomic(path, path.read_text() + early_stopping_report(summary))
  log(f"report: {workdir / layout.REPORT_FILE}")
  if diverged:  # The other arms are reported; the run still fails (exit 2).
    raise JbatError("; ".join(d["summary"] for d in diverged.values()) + f"; {hint}. "
                    "results.json and report.md hold the arms that finished")
  return summary


# Backbones from this size up drop their compiled programs between arms (release_compiled).
RELEASE_COMPILED_MIN_PARAMS = 20_000_000


def release_compiled(base: CausalLM) -> None:
  """Between stages, for a big backbone: drops jax's in-memory compiled programs and hands the
  freed heap back to the OS. Called after each arm and after each (re-)selection: an arm
  compiles its own training, evaluation and generation programs, a selection its surrogate and
  scoring ones (on a CPU each program of SmolLM2-135M's 30 unrolled layers holds ~80-100 MB:
  ~450 MB after one arm, ~400 MB after a selection), and holding one stage's programs while the
  next one trains set the run's peak memory. The next stage loads what it needs from the
  persistent compilation cache (<cache>/xla) instead. The same programs give the same numbers.
  Small backbones skip it: their programs are small and recompiling costs more than it saves."""
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
  if n_params < RELEASE_COMPILED_MIN_PARAMS:
    return
  jax.clear_caches()
  io.release_host_memory()


def run_arm(arm: str, seeds: Sequence[int], config: ml_collections.ConfigDict,
            task: sources.Task, base, tok, adapt, heldout, workdir: pathlib.Path,
            mesh, own: OwnData | None = None, test: protocol.Sealed | None = None,
            draw: int | None = None, matched: dict | None = None) -> dict[str, Any]:
  """Selects an arm's backbone documents (draw seed `draw`) and trains its adapters (one per
  seed); returns the arm's entry of results.json. `heldout` is the validation split; `test`
  the sealed test split, evaluated after each adapter's training; `matched` the re-selections
  (per seed) the oracle's re-draws match. Raises Diverged naming the arm (and seed) at the
  first seed that diverges: an arm is reported whole or not at all, and its later seeds are
  not run (they share the learning rate)."""
  try:
    chosen, facts = select_arm_docs(arm, config, task, base, tok, workdir, mesh, own=own,
                                    draw=draw)
  except Diverged as e:  # The surrogate (stage 1) of a selecting arm.
    raise e.within(f"arm {arm}", "train.lr", stage="surrogate training") from None
  release_compiled(base)  # The selection's surrogate and scoring programs.
  if arm != "none":
    log(f"arm {arm}: {len(chosen)} backbone documents selected"
        + (f", precision {facts['precision']:.2f}" if facts["precision"] is not None else ""))
  if own is not None:
    selected = own.examples(chosen)
  else:
    selected = pipeline.encode(chosen, tok, config.data.max_len) if chosen else []
  reselect = make_reselector(arm, config, task, base, tok, workdir, mesh, own=own, draw=draw,
                             matched=matched, first=chosen)
  runs = []
  for seed in seeds:
    try:
      r = train_one(arm, seed, base, config, adapt, heldout, selected, tok, workdir, mesh,
                    reselect=reselect, own=own, test=test)
    except Diverged as e:  # Raised before adapter.safetensors is written.
      stage = "adapter training" if e.stage.startswith("adapt [") else e.stage  # or reselection
      raise e.within(f"arm {arm} seed {seed}", "train.lr", seed=seed, stage=stage) from None
    io.release_host_memory()  # Training's and generation's host buffers.
    log(f"arm {arm} seed {seed}: valid NLL backbone {r['backbone_nll']:.4f} -> best "
        f"{r['best_nll']:.4f} (step {r['best_step']}), final {r['final_nll']:.4f}"
        + (f"; test NLL at that step {r['test_nll_best']:.4f}" if "test_nll_best" in r else ""))
    runs.append(r)
  out = {
      "best_nll": [r["best_nll"] for r in runs], "final_nll": [r["final_nll"] for r in runs],
      "best_step": [r["best_step"] for r in runs],
      "backbone_nll": runs[0]["backbone_nll"], "steps": runs[0]["steps"],
      "train_seconds": [r["train_seconds"] for r in runs],
      "distinct_docs": [r["distinct_docs"] for r in runs],
      "curves": [r["curve"] for r in runs], **facts}
  if config.train.get("patience", 0):
    out["early_stopping"] = {"patience": int(config.train.patience), "chosen_on": "valid",
                             "stopped_step": [r["stopped_step"] for r in runs]}
  if any(r.get("reselections") for r in runs):
    out["reselections"] = [r.get("reselections", []) for r in runs]
  for key in ("test_nll_backbone", "test_nll_best", "test_nll_final", "test_rouge_l_best",
              "test_rouge_l_final", "test_exact_match_best", "test_exact_match_final"):
    if key in runs[0]:
      out[key] = [r[key] for r in runs]
  for key in ("answers_best", "answers_final"):
    if key in runs[0]:
      out[key] = runs[0][key]  # The first seed's, for report.md.
  return out


def protocol_facts() -> dict[str, str]:
  """results.json's `protocol`: which split chose what (both paths)."""
  return {
      "best_step_chosen_on": "valid",
      "best_nll": "valid NLL at the best valid step",
      "final_nll": "valid NLL at the final step",
      "test_nll_best": "test NLL at the best valid step (the reported number)",
      "test_nll_final": "test NLL at the final step",
      "test_used_for": "reporting only (evaluated after training, never during it)"}


def own_summary(config: ml_collections.ConfigDict, own: OwnData,
                results: dict[str, Any]) -> dict[str, Any]:
  """results.json's facts of the user's path: the sources, the example counts, and which
  split chose what (the protocol)."""
  d = config.data
  return {
      "domain": "data.adapt", "n_adapt": len(own.adapt),
      "n_heldout": len(own.valid) + len(own.test),
      "n_valid": len(own.valid), "n_test": len(own.test), "counts": own.counts,
      "sources": {k: d[k] for k in ("adapt", "valid", "test", "pool", "format", "pool_format")}}


def protocol_report(summary: dict[str, Any]) -> str:
  """report.md's section on the protocol (both paths): which split chose what, the test NLLs,
  and (the user's path) the examples cut by max_len."""
  own = "counts" in summary
  valid, test = (("data.valid", "data.test") if own else
                 ("data.n_valid", "the rest of data.n_heldout"))
  lines = ["", "## Protocol", "",
           f"Every arm chose its best step on the **validation** split ({valid}, "
           f"{summary['n_valid']} examples): `best_nll` / `best_step` above are validation "
           f"numbers. The **test** split ({test}, {summary['n_test']} examples) chose "
           "nothing: it was evaluated once per arm and seed after training, at the best "
           f"validation step and at the final step ({summary.get('test_reads', 0)} reads in "
           "all).", ""]
  if own:
    c = summary["counts"]
    names = [k for k in ("adapt", "valid", "test", "pool") if "cut_by_max_len" in c.get(k, {})]
    lines += ["Examples cut by data.max_len (response cut away): "
              + ", ".join(f"{k} {c[k]['cut_by_max_len']} of {c[k]['read']}" for k in names)
              + ".", ""]
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


def early_stopping_report(summary: dict[str, Any]) -> str:
  """report.md's section on early stopping (train.patience): the step each adapter stopped at;
  only the validation split decided."""
  lines = ["", "## Early stopping", "",
           "Each adapter stopped after train.patience evaluations in a row without a new best "
           "**validation** NLL (the validation split alone decided; the test split never did). "
           "Stopped at step (per seed; '-': ran all steps):", ""]
  for name, a in summary["arms"].items():
    es = a.get("early_stopping")
    if es:
      steps = ", ".join("-" if s is None else str(s) for s in es["stopped_step"])
      lines.append(f"- {name}: {steps} (patience {es['patience']}; best step "
                   f"{', '.join(map(str, a['best_step']))})")
  return "\n".join(lines + [""])


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
