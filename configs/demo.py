"""The built-in demo: LoRA adaptation of a tiny causal LM to one fortunes category.

  python -m jbat.train --config configs/demo.py            # ~10 min cold on a 2-core CPU
  python -m jbat.train --config configs/demo.py:tiny       # seconds: a toy-size smoke run

Corpus: Debian's `fortunes` + `fortunes-min` (43 categories, ~15k short documents), fetched
into the cache without root. The adaptation set is 32 documents of `computers`; 200 more of
them are held out; the backbone pool is every other document (deduplicated). The backbone (a
4-layer, d=128 GPT-2-style LM, ~0.9M parameters) is pretrained on the pool on first use and
cached, so reruns take a few minutes. Arm "none" is plain LoRA adaptation on the 32 documents.
"""

from jbat.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "demo"
  c.data.source = "fortunes"
  c.data.domain = "computers"
  c.data.n_adapt = 32
  c.data.n_heldout = 200
  c.data.max_len = 64
  c.data.vocab_size = 1024

  # GPT-2 family at toy size: learned positions, LayerNorm, GELU MLP, tied embeddings.
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.d_ff = 512

  c.backbone.steps = 1500  # ~5 min on a 2-core CPU; the result is cached.
  c.backbone.batch_size = 32
  c.backbone.lr = 2e-3

  c.lora.rank = 8
  c.lora.alpha = 16.0

  # Learning rates >= 1e-3 overfit 32 documents within 15-30 steps (shared/findings.md).
  c.train.steps = 120
  c.train.batch_size = 8
  c.train.lr = 2e-4
  c.train.eval_every = 15
  c.train.ckpt_every = 15

  if arg == "tiny":  # Toy size for smoke tests: seconds on a CPU.
    c.name = "demo_tiny"
    c.data.n_heldout = 16
    c.data.vocab_size = 300
    c.data.max_len = 32
    c.model.d_model = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.d_ff = 64
    c.backbone.steps = 20
    c.backbone.ckpt_every = 10
    c.train.steps = 10
    c.train.eval_every = 5
    c.train.ckpt_every = 5
  return c
