"""The config schema, its validation, and run-directory bookkeeping.

Every config file in `configs/` starts from `base_config()` (the schema: every key that exists,
with its default and type) and changes values. `validate(config)` checks the whole config before
any work is done: unknown keys, wrong types, out-of-range values and missing paths raise a
`JbatError` naming the field, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import pathlib
import re
import socket
from typing import Any, Sequence

import jax
import ml_collections

from jbat import io, layout, registry
from jbat.errors import JbatError

SOURCES = ("fortunes", "healthtweets", "jsonl", "text_folder")

# Keys that change where/how a run reports, not what it computes: ignored by the fingerprint
# that guards a workdir against resuming a checkpoint of a different config.
NON_SEMANTIC_KEYS = ("workdir", "cache_dir", "progress", "train.log_every", "stop_after",
                     "distributed.coordinator", "distributed.num_processes",
                     "distributed.process_id", "distributed.auto")


def base_config() -> ml_collections.ConfigDict:
  """The schema: every config key, its default, and (through the default's type) its type."""
  c = ml_collections.ConfigDict()
  c.name = "run"  # Names the default workdir runs/<name>.
  c.workdir = ""  # Empty: runs/<name>.
  c.cache_dir = ""  # Empty: $JBAT_CACHE or ~/.cache/jbat. Holds corpora, tokenizers, backbones.
  c.seed = 0
  c.progress = True  # tqdm progress bars (process 0 only).
  c.pipeline = "lm"  # "lm": this schema; "personalize": jbat.diffusion.personalize's schema.
  # "": run everything; "select": stop once the ALBAT selection (manifest.jsonl) is written,
  # e.g. to score a big pool on a pod and train the adapters elsewhere.
  c.stop_after = ""

  # Multi-process runs (jbat.distributed). Empty: one process, or the JBAT_COORDINATOR /
  # JBAT_NUM_PROCESSES / JBAT_PROCESS_ID environment; auto: let JAX find a TPU pod / SLURM job.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator = ""  # "host:port" of process 0.
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.auto = False
  # Device mesh over all processes' devices: `data` x `model`. model > 1 splits the backbone's
  # parameters over that many devices (for backbones that do not fit one device).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.model = 1

  c.data = ml_collections.ConfigDict()
  c.data.source = "fortunes"  # One of SOURCES.
  c.data.path = ""  # jsonl file or text folder; unused for fortunes (fetched into cache_dir).
  c.data.text_field = "text"  # jsonl only.
  c.data.label_field = "label"  # jsonl only: the field holding each document's domain.
  c.data.domain = "computers"  # Adaptation domain: a label of the corpus.
  c.data.n_adapt = 32  # |D_A|: adaptation documents.
  # Held-out documents of the same domain: n_valid of them form the validation split (it
  # chooses the best step), the rest the test split (read once per arm and seed, at the end).
  c.data.n_heldout = 200
  c.data.n_valid = 0  # Validation documents of n_heldout (the rest: test); 0: half of them.
  # Pool documents whose character 5-gram Jaccard with an adaptation / validation / test
  # document (after jbat.data.neardup.normalise) is >= this are dropped from the pool and the
  # backbone's pretraining data (0: keep them).
  c.data.near_dup = 0.6
  c.data.max_len = 64  # Tokens per example (longer documents are truncated).
  c.data.vocab_size = 1024  # Byte-level BPE trained on the pool.
  # Fraction of the target domain's pool documents the backbone is pretrained on (1.0: all).
  # Below 1 the target is rare in pretraining, as niche data is in a real backbone; selection
  # still draws from the full pool.
  c.data.backbone_keep = 1.0
  # Labelled corpus: the split seeds whose adaptation / validation / test documents the backbone
  # never sees (empty: the run's split_seeds). With more than one, every split of the run uses
  # that one backbone (experiment.shared_pretrain_pool), so a run of fewer splits (e.g. one
  # costly arm on split 0) can share the backbone of a run of more.
  c.data.backbone_splits = ""
  # Your own data (jbat.data.splits): a task given as files instead of a labelled corpus. A spec
  # is comma-separated files, globs or folders: JSONL, JSONL.gz, Parquet, a folder of .txt.
  c.data.adapt = ""  # The task's training examples (a spec); empty: the labelled corpus above.
  c.data.valid = ""  # Validation examples: a spec, or a count N split off data.adapt (seeded).
  c.data.test = ""  # Test examples (reported, never used to choose): a spec, or a count N.
  c.data.pool = ""  # The backbone pool to select from (a spec), streamed per process.
  c.data.format = "text"  # Task examples: "text", "prompt_response" or "chat".
  c.data.pool_format = "text"  # Pool examples: "text", "prompt_response" or "chat".
  c.data.prompt_field = "prompt"  # prompt_response: the prompt's field (loss weight 0).
  c.data.response_field = "response"  # prompt_response: the response's field (loss weight 1).
  c.data.messages_field = "messages"  # chat: the field with the list of role/content messages.
  c.data.id_field = ""  # The field holding a record's stable id; empty: file + row.
  # More examples of the task's target as pool records (data.pool_format): the `oracle` arm's
  # documents with data.adapt (a reference; never part of data.pool). Empty: no oracle arm.
  c.data.oracle = ""
  # A built-in task that writes its files into the cache and sets data.adapt / valid / test /
  # pool / oracle before the run: "" (none) or "dictd" (definition questions from Debian's
  # dictd dictionaries, settings in `dictd`; jbat.data.dictd).
  c.data.task = ""

  # The dictd task (data.task = "dictd"): target dictionary, pool dictionaries, split sizes.
  c.dictd = ml_collections.ConfigDict()
  c.dictd.target = "jargon"  # The dictionary whose answers are learned (Debian dict-<name>).
  c.dictd.pool = "foldoc,devil,elements"  # The other dictionaries: the pool (plain text).
  c.dictd.n_adapt = 32  # Target entries as adaptation chat pairs.
  c.dictd.n_valid = 32  # Target entries for validation (chooses the best step).
  c.dictd.n_test = 64  # Target entries for test (reported only).
  c.dictd.n_oracle = 256  # More target entries: the oracle arm's documents (0: all the rest).
  c.dictd.n_pool = 0  # Pool entries kept by a seeded sample (0: all).
  c.dictd.max_chars = 400  # Definitions are cut at a sentence end within this many characters.
  c.dictd.seed = 0  # Seeds the split of the target's entries and the pool sample.

  c.model = ml_collections.ConfigDict()
  # A local Hugging Face model folder (gpt2 / llama / qwen2, safetensors): when set, it is the
  # backbone and its tokenizer is used; the size keys below and `backbone.*` are then ignored.
  c.model.pretrained = ""
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 0  # 0: same as n_heads (multi-head); fewer: grouped-query attention.
  c.model.d_ff = 512
  c.model.pos = "learned"  # "learned" (GPT-2) | "rope" (Llama).
  c.model.norm = "layernorm"  # "layernorm" | "rmsnorm".
  c.model.mlp = "gelu"  # "gelu" | "swiglu".
  c.model.tie_embeddings = True
  c.model.qkv_bias = False
  c.model.bias = True
  c.model.dtype = "float32"  # Compute dtype; "bfloat16" on accelerators.
  c.model.remat = False  # Recompute each block in the backward pass (less activation memory).
  # The losses over vocabulary chunks of this many rows, never [batch, length, vocab] logits
  # (jbat.losses; same values up to float rounding): 0 = auto (AUTO_VOCAB_CHUNK rows when the
  # vocabulary exceeds AUTO_VOCAB_CHUNK_ABOVE tokens, else full logits), -1 = always full logits.
  c.model.vocab_chunk = 0
  # The training loss's backward pass over groups of this many rows (jbat.losses.lm_loss; same
  # value up to float rounding): 0 = auto (AUTO_GRAD_ROWS rows above the same vocabulary size,
  # else the whole batch), -1 = the whole batch at once.
  c.model.grad_rows = 0
  # With model.pretrained (a Hugging Face folder) each run's adapters are also written in PEFT
  # format (peft/, peft_best/); this also writes them merged into the base weights.
  c.model.export_merged = False

  # Stage 0: full-parameter pretraining of the backbone on the pool (cached by content hash).
  c.backbone = ml_collections.ConfigDict()
  c.backbone.steps = 1500
  c.backbone.batch_size = 32
  c.backbone.lr = 2e-3
  c.backbone.warmup_steps = 100
  c.backbone.weight_decay = 0.01
  c.backbone.ckpt_every = 250

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = r".*(q_proj|k_proj|v_proj|o_proj|fc1|fc2|gate_proj|up_proj|down_proj)"
  c.lora.dora = False  # DoRA: a learned magnitude per output column (jbat.lora.DoRALinear).

  # Adaptation training (every arm uses the same schedule and seeds).
  c.train = ml_collections.ConfigDict()
  c.train.steps = 120
  c.train.batch_size = 8
  c.train.lr = 2e-4
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.0
  c.train.clip_norm = 1.0
  c.train.eval_every = 15
  c.train.ckpt_every = 15
  c.train.keep = 2  # Checkpoints kept (the best adapter is kept separately).
  c.train.log_every = 5
  c.train.eval_batch_size = 32
  # Micro-batches per step (gradients averaged): the same step with 1/grad_accum the
  # activation memory. Used by the adapters and the surrogate.
  c.train.grad_accum = 1
  # Early stopping: stop an adapter after this many evaluations in a row (every
  # train.eval_every steps) without a new best validation NLL; 0: off. Only the validation
  # split decides (data.valid, or the held-out documents); the step is in results.json.
  c.train.patience = 0

  # Stage 1: the surrogate adapter, trained on the adaptation set with the train.* settings.
  c.surrogate = ml_collections.ConfigDict()
  c.surrogate.steps = 60

  # Stages 2-3: score the pool and select (used by the arm "albat" and by score-named arms).
  c.select = ml_collections.ConfigDict()
  c.select.score = "loss_diff"  # The ALBAT default score (arm "albat").
  c.select.rule = "topk"  # One of registry.RULES.
  c.select.k = 256  # Backbone documents selected.
  c.select.top_n = 0  # Threshold rules: sample among the top_n that pass tau (0: all that pass).
  c.select.tau = "default"  # "default" (0 for align/loss_diff), "none", or a number.
  c.select.n_clusters = 8  # rule "cluster".
  c.select.batch_size = 32  # Scoring batch (global: split over all devices).
  c.select.chunk_batches = 64  # Scoring batches per chunk file / resume point.
  # The `less` arm's pool pass in batches of this many (0: select.batch_size); its warm-up
  # still trains at select.batch_size. Its per-example projection costs less per example in
  # bigger batches (docs/method.md, "less").
  c.select.less_batch_size = 0

  # Stage 4: BAT mixture. Backbone arms add rows so each batch keeps train.batch_size
  # adaptation rows and a fraction rho of backbone rows, their loss weighted by lam.
  c.bat = ml_collections.ConfigDict()
  c.bat.rho = 0.5
  c.bat.lam = 1.0
  # Re-selection around the current adapter (arm albat and model-score arms): every
  # reselect_every steps (0: never) a surrogate is trained on D_A from the BAT adapter as it is,
  # the pool is rescored with it and k documents selected again for the next phase. The
  # rescored pool is the top reselect_top documents of the arm's first ranking (0: all).
  # reselect_from = "init" is a control: the stage-1 surrogate again (a new sample of the same
  # ranking) instead of one trained from the current adapter.
  c.bat.reselect_every = 0
  c.bat.reselect_top = 0
  c.bat.reselect_from = "adapter"

  # Task metrics on data.test (own-data path): greedy answers of the test prompts at the best
  # validation step (and at the final step), scored against the reference answers.
  c.eval = ml_collections.ConfigDict()
  c.eval.generate = False  # Generate test answers and report ROUGE-L / exact match.
  c.eval.max_new_tokens = 64  # Tokens generated per answer (greedy, stops at eos).
  c.eval.batch_size = 16  # Test prompts per generation batch.
  c.eval.at = "best"  # Adapter states to generate with: "best" or "best,final".
  c.eval.n_examples = 3  # Generated answers per arm shown in report.md beside the reference.

  c.arms = "none"  # Comma-separated arms: registry.BASE_ARMS or score names.
  c.seeds = "0"  # Comma-separated training seeds; arms are paired by seed.
  # Seeds of the target split (which documents are adaptation / validation / test; the data.*
  # count splits of your own files) and of the draws (random, oracle, the selection's surrogate
  # and rule). Empty: `seed` alone. Arms are paired by (split, draw, training seed).
  c.split_seeds = ""
  c.draw_seeds = ""  # Draw seeds (random, oracle, selection); empty: `seed` alone.
  return c


def results_variant(c: ml_collections.ConfigDict, arg: str | None) -> None:
  """The variants of the text demos (configs/demo*.py) behind docs/results.md.

  full: 3 target splits (one backbone, pretrained without any split's target documents),
    arms none / random / oracle / albat / dsir; the variance over splits is in every interval.
  less: LESS as its authors run it (a warm-up LoRA, gradients at 4 checkpoints of every pool
    document: ~4 backward passes and an 8192-dim projection per document) is too costly for 3
    splits on a CPU, so it runs on split 0 only, with the backbone of `full`
    (data.backbone_splits) and the arms it is compared with, paired by seed.
  """
  if arg == "full":
    c.name += "_full"
    c.split_seeds = "0,1,2"
    c.arms = "none,random,oracle,albat,dsir"
  elif arg == "less":
    c.name += "_less"
    c.split_seeds = "0"
    c.data.backbone_splits = "0,1,2"
    c.arms = "none,random,albat,less"
    c.select.less_batch_size = 256  # Its projection ~1.4x cheaper per example than at 64.


def flatten(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{"section.key": value} of a (nested) ConfigDict."""
  out = {}
  for k, v in c.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def check_schema(config: ml_collections.ConfigDict,
                 schema: ml_collections.ConfigDict | None = None) -> None:
  """JbatError for the first key of `config` that is not in `schema` (default: this module's
  `base_config()`) or whose value's type differs from the schema default's (ints pass for
  floats, bools never for ints), or that is a NaN or infinite float."""
  schema = flatten(base_config() if schema is None else schema)
  given = flatten(config)
  for key, value in given.items():
    if key not in schema:
      section = key.rsplit(".", 1)[0] + "." if "." in key else ""
      known = sorted(k for k in schema if k.startswith(section) and "." not in k[len(section):])
      raise JbatError(f"config: unknown key {key!r}; known keys here: {', '.join(known)}")
    want = type(schema[key])
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
      ok = True
    if not ok:
      raise JbatError(
          f"config: {key} must be {want.__name__}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
      raise JbatError(f"config: {key} must be a finite number, got {value!r}")


def load_config_file(path: str | os.PathLike, arg: str | None = None
                     ) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file given by path (a config built on another one, tests,
  benchmarks)."""
  import importlib.util
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"jbat_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _positive(config, *keys: str) -> None:
  flat = flatten(config)
  for key in keys:
    if flat[key] <= 0:
      raise JbatError(f"config: {key} must be > 0, got {flat[key]!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the whole config; raises JbatError naming the first bad field."""
  check_schema(config)
  _positive(config, "data.n_adapt", "data.n_heldout", "data.max_len", "data.vocab_size",
            "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff",
            "backbone.steps", "backbone.batch_size", "backbone.lr", "backbone.ckpt_every",
            "lora.rank", "lora.alpha", "train.steps", "train.batch_size", "train.lr",
            "train.eval_every", "train.ckpt_every", "train.keep", "train.log_every",
            "train.eval_batch_size", "surrogate.steps", "select.k", "select.n_clusters",
            "select.batch_size", "select.chunk_batches", "train.grad_accum", "mesh.model",
            "eval.max_new_tokens", "eval.batch_size")
  validate_task(config)
  for key in ("vocab_chunk", "grad_rows"):
    value = config.model[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
      raise JbatError(f"config: model.{key} must be an integer >= -1 (0: auto, -1: off), got "
                      f"{value!r}")
  if config.model.n_kv_heads < 0:
    raise JbatError(f"config: model.n_kv_heads must be >= 0, got {config.model.n_kv_heads}")
  if config.select.top_n < 0:
    raise JbatError(f"config: select.top_n must be >= 0, got {config.select.top_n}")
  if config.select.less_batch_size < 0:
    raise JbatError(f"config: select.less_batch_size must be >= 0 (0: select.batch_size), got "
                    f"{config.select.less_batch_size}")
  if not isinstance(config.train.patience, int) or config.train.patience < 0:
    raise JbatError(f"config: train.patience must be an integer >= 0 (0: no early stopping), "
                    f"got {config.train.patience!r}")
  if config.train.clip_norm < 0 or config.train.warmup_steps < 0:
    raise JbatError("config: train.clip_norm and train.warmup_steps must be >= 0")
  choices = {"data.source": SOURCES, "model.pos": ("learned", "rope"),
             "model.norm": ("layernorm", "rmsnorm"), "model.mlp": ("gelu", "swiglu"),
             "model.dtype": ("float32", "bfloat16"), "pipeline": ("lm",),
             "stop_after": ("", "select")}
  flat = flatten(config)
  for key, allowed in choices.items():
    if flat[key] not in allowed:
      raise JbatError(f"config: {key} must be one of {', '.join(allowed)}; got {flat[key]!r}")
  known = registry.BASE_ARMS + registry.SCORES
  arms = arm_list(config)
  if not arms:
    raise JbatError("config: arms is empty; name at least one arm, e.g. 'none'")
  for arm in arms:
    if arm not in known:
      raise JbatError(f"config: arms: unknown arm {arm!r}; available: {', '.join(known)}")
  registry.check_score(config.select.score, "config: select.score")
  registry.check_rule(config.select.rule, "config: select.rule")
  registry.parse_tau(config.select.tau)
  if not 0.0 <= config.bat.rho < 1.0:
    raise JbatError(f"config: bat.rho must be in [0, 1), got {config.bat.rho}")
  if config.bat.lam < 0:
    raise JbatError(f"config: bat.lam must be >= 0, got {config.bat.lam}")
  for key in ("reselect_every", "reselect_top"):
    if config.bat[key] < 0:
      raise JbatError(f"config: bat.{key} must be >= 0, got {config.bat[key]}")
  if config.bat.reselect_from not in ("adapter", "init"):
    raise JbatError(f"config: bat.reselect_from must be 'adapter' or 'init', got "
                    f"{config.bat.reselect_from!r}")
  if config.bat.reselect_top and config.bat.reselect_top < config.select.k:
    raise JbatError(f"config: bat.reselect_top={config.bat.reselect_top} must be 0 (the whole "
                    f"pool) or >= select.k ({config.select.k})")
  if not 0.0 < config.data.backbone_keep <= 1.0:
    raise JbatError(f"config: data.backbone_keep must be in (0, 1], got "
                    f"{config.data.backbone_keep}")
  for key, value in (("seeds", config.seeds), ("split_seeds", config.split_seeds),
                     ("draw_seeds", config.draw_seeds),
                     ("data.backbone_splits", config.data.backbone_splits)):
    try:
      seeds = _int_list(value)
    except ValueError:
      raise JbatError(
          f"config: {key} must be comma-separated integers, got {value!r}") from None
    if (key == "seeds" and not seeds) or len(set(seeds)) != len(seeds):
      raise JbatError(f"config: {key} must be distinct integers, got {value!r}")
  if not 0.0 <= config.data.near_dup <= 1.0:
    raise JbatError(f"config: data.near_dup must be in [0, 1] (0: off), got "
                    f"{config.data.near_dup}")
  if config.data.n_valid < 0:
    raise JbatError(f"config: data.n_valid must be >= 0, got {config.data.n_valid}")
  if not config.data.adapt:
    n_valid, n_test = heldout_split(config)
    if n_valid < 1 or n_test < 1:
      raise JbatError(f"config: data.n_heldout={config.data.n_heldout} must hold a validation "
                      f"and a test split (data.n_valid={config.data.n_valid} of them validate, "
                      "0: half): at least 1 each")
  try:
    re.compile(config.lora.targets)
  except re.error as e:
    raise JbatError(f"config: lora.targets is not a valid regex: {e}") from None
  if config.data.source in ("jsonl", "text_folder"):
    if not config.data.path:
      raise JbatError(f"config: data.path is required when data.source={config.data.source!r}")
    p = pathlib.Path(config.data.path).expanduser()
    want_dir = config.data.source == "text_folder"
    if not (p.is_dir() if want_dir else p.is_file()):
      kind = "folder" if want_dir else "file"
      raise JbatError(f"config: data.path: {kind} {str(p)!r} does not exist")
  from jbat.data import splits  # The own-data keys (data.adapt, data.pool, ...).
  splits.validate(config.data)
  from jbat.models import hub_free  # pylint: disable=import-outside-toplevel
  if config.model.pretrained and hub_free.parse_wheel_spec(config.model.pretrained):
    pass  # A file in a wheel of the package index: fetched when the run starts.
  elif config.model.pretrained:
    p = pathlib.Path(config.model.pretrained).expanduser()
    if p.suffix == ".gguf" and not p.is_file():
      raise JbatError(f"config: model.pretrained: GGUF file {str(p)!r} does not exist")
    if p.suffix != ".gguf" and not (p / "config.json").is_file():
      raise JbatError(f"config: model.pretrained: {str(p)!r} is not a Hugging Face model folder "
                      "(expected a config.json in it) or a .gguf file")
  if not config.model.pretrained and config.data.vocab_size < 259:
    raise JbatError(f"config: data.vocab_size must be >= 259 (3 special tokens + 256 bytes of "
                    f"the byte-level BPE), got {config.data.vocab_size}")
  if config.train.batch_size % config.train.grad_accum:
    raise JbatError(f"config: train.batch_size={config.train.batch_size} must be a multiple of "
                    f"train.grad_accum={config.train.grad_accum}")
  if not config.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", config.name):
    raise JbatError(f"config: name must be a non-empty file-name-safe string, got {config.name!r}")


def validate_task(config: ml_collections.ConfigDict) -> None:
  """Checks data.task / dictd.* / data.oracle / eval.* (JbatError naming the key)."""
  d = config.data
  if d.task not in ("", "dictd"):
    raise JbatError(f"config: data.task must be '' or 'dictd', got {d.task!r}")
  if d.task:
    given = [k for k in ("adapt", "valid", "test", "pool", "oracle") if d[k]]
    if given:
      raise JbatError(f"config: data.task={d.task!r} writes data.{given[0]} itself; leave "
                      f"data.{', data.'.join(given)} empty")
    dd = config.dictd
    for key in ("n_adapt", "n_valid", "n_test", "max_chars"):
      if dd[key] < 1:
        raise JbatError(f"config: dictd.{key} must be >= 1, got {dd[key]}")
    for key in ("n_oracle", "n_pool"):
      if dd[key] < 0:
        raise JbatError(f"config: dictd.{key} must be >= 0, got {dd[key]}")
    pool = [s.strip() for s in dd.pool.split(",") if s.strip()]
    if not dd.target or dd.target in pool:
      raise JbatError(f"config: dictd.target {dd.target!r} must be set and not among "
                      f"dictd.pool ({dd.pool!r})")
  elif d.oracle:
    if not d.adapt:
      raise JbatError("config: data.oracle is set but data.adapt is empty")
    from jbat.data import files  # pylint: disable=import-outside-toplevel
    files.resolve(d.oracle, "config: data.oracle")
  at = [s.strip() for s in config.eval.at.split(",") if s.strip()]
  if not at or any(s not in ("best", "final") for s in at):
    raise JbatError(f"config: eval.at must be 'best' or 'best,final', got {config.eval.at!r}")
  if config.eval.n_examples < 0:
    raise JbatError(f"config: eval.n_examples must be >= 0, got {config.eval.n_examples}")


def check_select_k(config: ml_collections.ConfigDict, n_pool: int) -> None:
  """JbatError if an arm that selects backbone documents (every arm but `none`) asks for more
  (select.k) than the pool holds: like `jbat.selection.select`, the CLI never clamps k."""
  if any(a != "none" for a in arm_list(config)) and config.select.k > n_pool:
    raise JbatError(f"config: select.k={config.select.k} is larger than the backbone pool "
                    f"({n_pool} documents of data.source={config.data.source!r}); lower "
                    f"select.k")


def arm_list(config: ml_collections.ConfigDict) -> list[str]:
  return [a.strip() for a in config.arms.split(",") if a.strip()]


def _int_list(text: str) -> list[int]:
  return [int(s) for s in text.split(",") if s.strip()]


def seed_list(config: ml_collections.ConfigDict) -> list[int]:
  return _int_list(config.seeds)


def split_seed_list(config: ml_collections.ConfigDict) -> list[int]:
  """The target-split seeds (config.split_seeds; empty: [config.seed])."""
  return _int_list(config.split_seeds) or [config.seed]


def backbone_split_list(config: ml_collections.ConfigDict) -> list[int]:
  """The split seeds the backbone excludes (data.backbone_splits; empty: split_seed_list)."""
  return _int_list(config.data.backbone_splits) or split_seed_list(config)


def draw_seed_list(config: ml_collections.ConfigDict) -> list[int]:
  """The draw seeds (config.draw_seeds; empty: [config.seed])."""
  return _int_list(config.draw_seeds) or [config.seed]


def heldout_split(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(validation, test) document counts of a labelled corpus's data.n_heldout."""
  n_valid = config.data.n_valid or config.data.n_heldout // 2
  return n_valid, config.data.n_heldout - n_valid


# model.vocab_chunk = 0 (auto): chunks of this many rows above this vocabulary size. At 49k
# tokens, 80 tokens and 16 rows the full logits are 250 MB per [B, T, V] buffer, chunks 42 MB.
AUTO_VOCAB_CHUNK = 8192
AUTO_VOCAB_CHUNK_ABOVE = 32768
# model.grad_rows = 0 (auto): backward passes over groups of this many rows above that size
# (a 16-row surrogate step of SmolLM2-135M at 80 tokens: 2.9 GB of XLA temporaries at once;
# in 2-row groups the whole step peaks at 2.6 GB RSS).
AUTO_GRAD_ROWS = 2


def vocab_chunk(config: ml_collections.ConfigDict, vocab_size: int) -> int | None:
  """The LMConfig.vocab_chunk of a model with `vocab_size` tokens under model.vocab_chunk."""
  chunk = config.model.vocab_chunk
  if chunk == 0:
    return AUTO_VOCAB_CHUNK if vocab_size > AUTO_VOCAB_CHUNK_ABOVE else None
  return None if chunk < 0 else int(chunk)


def grad_rows(config: ml_collections.ConfigDict, vocab_size: int) -> int | None:
  """The LMConfig.grad_rows of a model with `vocab_size` tokens under model.grad_rows."""
  rows = config.model.grad_rows
  if rows == 0:
    return AUTO_GRAD_ROWS if vocab_size > AUTO_VOCAB_CHUNK_ABOVE else None
  return None if rows < 0 else int(rows)


def workdir(config: ml_collections.ConfigDict) -> pathlib.Path:
  return pathlib.Path(config.workdir or os.path.join("runs", config.name)).expanduser()


def pretrained_path(config: ml_collections.ConfigDict) -> pathlib.Path:
  """model.pretrained as a local folder or file ("wheel:" specs fetched into the cache)."""
  from jbat.models import hub_free  # pylint: disable=import-outside-toplevel
  return hub_free.resolve_pretrained(config.model.pretrained, cache_dir(config))


def cache_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  d = config.cache_dir or os.environ.get("JBAT_CACHE") or "~/.cache/jbat"
  return pathlib.Path(d).expanduser()


def check_dirs(config: ml_collections.ConfigDict) -> None:
  """JbatError if the workdir or the cache folder (cache_dir, else $JBAT_CACHE) cannot be a
  folder: it, or a folder above it, is an existing file. Checked before anything is written."""
  for what, path in (("workdir", workdir(config)), ("cache folder", cache_dir(config))):
    key = ("workdir" if what == "workdir" else "cache_dir" if config.cache_dir else
           "$JBAT_CACHE" if os.environ.get("JBAT_CACHE") else "the default cache")
    for p in (path, *path.absolute().parents):
      if p.exists() and not p.is_dir():
        raise JbatError(f"config: {key}: the {what} {str(path)!r} cannot be a folder: "
                        f"{str(p)!r} is a file")


# Workdir locks held by this process: {workdir: open lock file}.
_LOCKS: dict[pathlib.Path, Any] = {}
LOCK_FILE = ".lock"


def lock_workdir(wd: pathlib.Path) -> None:
  """Takes the workdir's lock (an exclusive `flock` on <workdir>/.lock, holding "pid host"),
  or raises JbatError naming the process that holds it. The OS drops the lock when its process
  dies, so a crashed run never leaves it stuck; `release_workdirs` drops it at the end of a
  run. Only process 0 of a multi-process run takes it (its processes share the workdir)."""
  wd = wd.absolute()
  if wd in _LOCKS or jax.process_index() != 0:
    return
  wd.mkdir(parents=True, exist_ok=True)
  f = open(wd / LOCK_FILE, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().split()
    f.close()
    who = (f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process")
    raise JbatError(f"workdir {str(wd)!r} is in use by {who} (lock {wd / LOCK_FILE}); wait for "
                    "it to finish or use another --config.workdir") from None
  f.seek(0)
  f.truncate()
  f.write(f"{os.getpid()} {socket.gethostname()}\n")
  f.flush()
  _LOCKS[wd] = f


def release_workdirs() -> None:
  """Drops the workdir locks this process holds (the end of a run)."""
  while _LOCKS:
    _, f = _LOCKS.popitem()
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of everything that changes results: the keys that differ from the schema's default
  (NON_SEMANTIC_KEYS excluded). Keys at their default are left out, so a key added to the
  schema later (with a default that keeps the old behaviour) does not orphan existing
  workdirs."""
  defaults = flatten(base_config())
  flat = {k: v for k, v in flatten(config).items()
          if k not in NON_SEMANTIC_KEYS and (k not in defaults or defaults[k] != v)}
  return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def _differs_only_in(config: ml_collections.ConfigDict, old: dict[str, Any],
                     keys: Sequence[str]) -> bool:
  """Whether `config` with the stored run's values of the top-level `keys` has the stored
  run's fingerprint (config.json: {"fingerprint", "config"})."""
  stored = old.get("config")
  if not keys or not isinstance(stored, dict) or any(k not in stored for k in keys):
    return False
  probe = ml_collections.ConfigDict(config.to_dict())
  for k in keys:
    probe[k] = stored[k]
  return fingerprint(probe) == old.get("fingerprint")


def prepare_workdir(config: ml_collections.ConfigDict,
                    extendable: Sequence[str] = ()) -> pathlib.Path:
  """Creates the workdir (or checks it belongs to this config), takes its lock (`lock_workdir`:
  a second run on the same workdir is refused) and saves config.json (process 0 writes it).

  A workdir that already holds a run of a different config (different fingerprint) is refused:
  resuming its checkpoints would silently mix two experiments. Except in the top-level keys
  `extendable` (a pipeline whose units do not depend on each other, e.g. ("arms", "seeds")):
  a config that differs from the stored one only there is accepted, so a rerun adds the arms
  or seeds that are missing and reuses every finished unit.
  """
  check_dirs(config)  # Also for callers that skip the CLI (notebooks).
  wd = workdir(config)
  cfg_path = wd / layout.CONFIG_FILE
  fp = fingerprint(config)
  if cfg_path.exists():
    try:
      old = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
      raise JbatError(
          f"{cfg_path}: not valid JSON ({e}); remove the workdir to start over") from None
    if old.get("fingerprint") != fp and not _differs_only_in(config, old, extendable):
      raise JbatError(
          f"workdir {str(wd)!r} holds a run of a different config (fingerprint "
          f"{old.get('fingerprint')} != {fp}); use another --config.workdir or delete it")
  elif wd.exists() and any(wd.iterdir()):
    if (wd / "adapt").exists() or (wd / "checkpoints").exists():
      raise JbatError(f"workdir {str(wd)!r} holds checkpoints but no config.json; "
                      "use another --config.workdir or delete it")
  lock_workdir(wd)  # After the checks above, which write nothing; before the first write.
  if jax.process_index() == 0:
    io.write_json_atomic(cfg_path, {"fingerprint": fp, "config": to_dict(config)})
  return wd
