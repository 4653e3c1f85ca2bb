"""ALBAT on your own pretrained model (Hugging Face layout) and your own task files.

  python -m jbat.train --config configs/hf_lora.py \\
      --config.model.pretrained=/path/to/hf_model_dir \\
      --config.data.adapt=task/train.jsonl --config.data.format=chat \\
      --config.data.valid=task/valid.jsonl --config.data.test=task/test.jsonl \\
      --config.data.pool='pool/*.parquet,pool/*.jsonl.gz'

`model.pretrained` is a local folder with `config.json` (model_type gpt2, llama or qwen2: GPT-2,
SmolLM, TinyLlama, Llama 2/3, Qwen2/2.5), `model.safetensors` (or sharded with
`model.safetensors.index.json`) and the tokenizer files. Nothing is downloaded: fetch the
model yourself first (e.g. `huggingface-cli download <repo> --local-dir <dir>`).

Task files (data.adapt, data.valid, data.test: JSONL, JSONL.gz or Parquet) are in data.format:
`chat` (a list of role/content messages in data.messages_field, rendered with the tokenizer's
chat template), `prompt_response` (data.prompt_field / data.response_field) or `text`; the
loss is on the response tokens only. data.valid / data.test may instead be counts split off
data.adapt. The pool (data.pool: comma-separated files, globs or text folders) is in
data.pool_format (default `text`). Arms: plain LoRA (`none`), LoRA + random pool documents
(`random`) and LoRA + the ALBAT selection (`albat`: relative loss difference, sampled uniformly
among the best `select.top_n`), on paired seeds. Each arm's best step is chosen on data.valid;
data.test is reported at that step. Outputs per arm and seed under the workdir (arms/<arm>/
seed_<s>/): adapter.safetensors and PEFT adapters (peft/: final, peft_best/: best on valid);
the selection manifest is select/rel_loss_diff/selection/manifest.jsonl (id, uid, file, row,
score, rank, text).
Time: dominated by the model size; a ~135M-parameter model adapts in minutes on a GPU, much
longer on a CPU.

`configs/hf_lora.py:corpus` is plain LoRA on a labelled JSONL corpus instead (data.path, with
the domain in data.label_field; data.n_adapt documents of data.domain are the adaptation set,
data.n_heldout more are held out, every other document is the pool).
"""

from jbat.config import base_config


def get_config(arg: str | None = None):
  if arg == "corpus":
    return corpus_config()
  c = base_config()
  c.name = "hf_lora"
  c.model.pretrained = "models/my-hf-model"  # Override with --config.model.pretrained=...
  c.model.dtype = "float32"  # "bfloat16" on accelerators.
  c.data.adapt = "data/train.jsonl"  # Override with --config.data.adapt=...
  c.data.valid = "50"  # Files, or a count split off data.adapt.
  c.data.test = "50"  # Files, or a count split off data.adapt.
  c.data.pool = "data/pool"  # Files, globs or text folders, comma-separated.
  c.data.format = "prompt_response"
  c.data.pool_format = "text"
  c.data.max_len = 256
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.train.steps = 200
  c.train.batch_size = 8
  c.train.lr = 2e-4
  c.train.eval_every = 20
  c.train.ckpt_every = 20
  c.surrogate.steps = 60
  # The measured ALBAT recipe (README): relative loss difference, then sample uniformly among
  # the best top_n (a threshold for precision, sampling for coverage of the task's modes).
  c.select.score = "rel_loss_diff"
  c.select.rule = "threshold_uniform"
  c.select.k = 256
  c.select.top_n = 1500
  c.bat.rho = 0.5
  c.bat.lam = 1.0
  c.arms = "none,random,albat"
  c.seeds = "0,1,2"
  return c


def corpus_config():
  """Plain LoRA on a labelled JSONL corpus (the labelled-corpus benchmark harness)."""
  c = base_config()
  c.name = "hf_lora"
  c.model.pretrained = "models/my-hf-model"
  c.model.dtype = "float32"
  c.data.source = "jsonl"
  c.data.path = "data/corpus.jsonl"  # Override with --config.data.path=...
  c.data.text_field = "text"
  c.data.label_field = "domain"
  c.data.domain = "target"
  c.data.n_adapt = 32
  c.data.n_heldout = 200
  c.data.max_len = 128
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.train.steps = 200
  c.train.batch_size = 8
  c.train.lr = 2e-4
  c.train.eval_every = 20
  c.train.ckpt_every = 20
  return c
