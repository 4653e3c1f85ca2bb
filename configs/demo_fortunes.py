"""Second demo task: ALBAT on one fortunes category, so results are not tuned to one task.

  python -m jbat.train --config configs/demo_fortunes.py         # ~12 min cold, 2-core CPU
  python -m jbat.train --config configs/demo_fortunes.py:tiny    # toy size, seconds

Corpus: Debian's `fortunes` + `fortunes-min` (43 categories, ~15k short documents), fetched
into the cache without root. The adaptation set is 32 documents of `computers`; 200 more
validate, 200 more are the test split; the backbone pool is every other document
(deduplicated); as in the tweets demo only 10% of the category's pool documents are used to
pretrain the backbone (a 4-layer, d=128 GPT-2-style LM, ~0.9M parameters, cached), while
selection draws from the full pool.
"""

from jbat.config import base_config, results_variant


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "demo_fortunes"
  c.data.source = "fortunes"
  c.data.domain = "computers"
  c.data.n_adapt = 32
  # 400 held out: 200 test documents (the same ones as the earlier 200 held-out documents
  # for split seed 0) and 200 more that validate (choose steps).
  c.data.n_heldout = 400
  c.data.n_valid = 200
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

  # Learning rates >= 1e-3 overfit 32 documents within 15-30 steps (docs/results_old_protocol.md, "Early measurements").
  c.train.steps = 120
  c.train.batch_size = 8
  c.train.lr = 2e-4
  c.train.eval_every = 15
  c.train.ckpt_every = 15
  c.surrogate.steps = 60
  c.data.backbone_keep = 0.1

  # The same ALBAT default as configs/demo.py.
  c.select.score = "rel_loss_diff"
  c.select.rule = "threshold_uniform"
  c.select.top_n = 1500
  c.select.k = 256
  c.select.batch_size = 64
  c.bat.reselect_every = 60
  c.bat.reselect_top = 3000
  c.arms = "none,random,oracle,albat"
  c.seeds = "0,1,2"

  results_variant(c, arg)
  if arg == "tiny":  # Toy size for smoke tests: seconds on a CPU.
    c.name = "demo_fortunes_tiny"
    c.data.n_heldout = 16  # 8 validate, 8 test.
    c.data.n_valid = 0
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
    c.surrogate.steps = 5
    c.select.k = 16
    c.select.top_n = 64
    c.bat.reselect_every = 0
    c.arms = "none,random"
    c.seeds = "0"
  elif arg not in (None, "", "full", "less"):
    raise ValueError(f"configs/demo_fortunes.py: unknown variant {arg!r} (known: full, less, "
                     "tiny)")
  return c
