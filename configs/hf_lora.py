"""LoRA adaptation of your own pretrained model (Hugging Face layout) on your own corpus.

  python -m jbat.train --config configs/hf_lora.py \\
      --config.model.pretrained=/path/to/hf_model_dir \\
      --config.data.path=/path/to/corpus.jsonl --config.data.domain=<label>

`model.pretrained` is a local folder with `config.json` (model_type gpt2, llama or qwen2: GPT-2,
SmolLM, TinyLlama, Llama 2/3, Qwen2/2.5), `model.safetensors` (or sharded with
`model.safetensors.index.json`) and the tokenizer files. Nothing is downloaded: fetch the
model yourself first (e.g. `huggingface-cli download <repo> --local-dir <dir>`).
The corpus is JSONL: one object per line with the text in `text` and the domain in `domain`;
the adaptation set is `data.n_adapt` documents of `data.domain`, `data.n_heldout` more are held
out, and every other document is the backbone pool. Time: dominated by the model size; a
~135M-parameter model adapts in minutes on a GPU, much longer on a CPU.
"""

from jbat.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "hf_lora"
  c.model.pretrained = "models/my-hf-model"  # Override with --config.model.pretrained=...
  c.model.dtype = "float32"  # "bfloat16" on accelerators.
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
