"""A third task for the ALBAT default: the tweets of another account, `goodhealth`.

  python -m jbat.train --config configs/demo_goodhealth.py   # ~15 min cold on a 2-core CPU

Everything is configs/demo.py except the target account. The account was fixed before any
result was seen, by a rule: the largest account other than bbchealth (7,478 tweets; lifestyle
and wellness headlines, unlike bbchealth's news). The recipe is not tuned for it. It checks
that the default does not only work on the task it was chosen on; configs/demo_fortunes.py
is the other check (a fortunes category).
"""


from jbat.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "demo_goodhealth"
  c.data.source = "healthtweets"
  c.data.domain = "goodhealth"
  c.data.n_adapt = 32
  c.data.n_heldout = 200
  c.data.max_len = 48  # Tweets are short: ~20 BPE tokens on average.
  c.data.vocab_size = 1024
  c.data.backbone_keep = 0.1

  # GPT-2 family at toy size (0.9M parameters): learned positions, LayerNorm, GELU, tied.
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.d_ff = 512

  c.backbone.steps = 1500  # ~5 min on a 2-core CPU, cached afterwards.
  c.backbone.batch_size = 32
  c.backbone.lr = 2e-3

  c.lora.rank = 8
  c.lora.alpha = 16.0

  # Learning rates >= 1e-3 overfit 32 examples within 15-30 steps (shared/findings.md).
  c.train.steps = 120
  c.train.batch_size = 8
  c.train.lr = 2e-4
  c.train.eval_every = 15
  c.train.ckpt_every = 15
  c.surrogate.steps = 60

  # ALBAT default: relative loss difference, then sample uniformly among the top 1500 (the
  # threshold keeps precision high, sampling keeps the target's modes covered); see README.
  c.select.score = "rel_loss_diff"
  c.select.rule = "threshold_uniform"
  c.select.top_n = 1500
  c.select.k = 256
  c.select.batch_size = 64
  c.bat.rho = 0.5
  c.bat.lam = 1.0

  c.arms = "none,random,oracle,albat"
  c.seeds = "0,1,2"

  if arg == "tiny":  # Toy size for smoke tests: well under a minute on a CPU.
    c.name = "demo_goodhealth_tiny"
    c.data.n_heldout = 16
    c.data.vocab_size = 300
    c.data.max_len = 24
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
    c.arms = "none,albat"
    c.seeds = "0,1"
  return c
