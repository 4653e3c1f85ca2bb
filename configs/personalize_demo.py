"""DreamBooth-style personalization of a small diffusion model, with ALBAT-selected backbone data.

  python -m jbat.train --config configs/personalize_demo.py        # 3 subjects x 4 arms, 1 seed
  python -m jbat.train --config configs/personalize_demo.py:full   # 6 subjects x 2 seeds x 6 arms
  python -m jbat.train --config configs/personalize_demo.py:tiny   # digits, toy size (tests)

Task: Fashion-MNIST (Debian `dataset-fashion-mnist`, fetched into the cache). The backbone is
a class-conditional U-Net (2x2 stem, 32/64 channels, attention at 7x7, v-prediction, cosine
schedule, EMA weights, DDIM + classifier-free guidance) pretrained on the train split and
cached. Subjects: the largest k-means cluster (2 with :full; pixel space) of the test images of
each of t-shirt, sneaker and bag, each split 5 adaptation / 10 validation / up to 100 test
images. Arms (same steps, seeds, rows per batch): none, prior (DreamBooth prior preservation
with backbone-generated class images, weight 1.0), random (random pool images) and albat
(surrogate LoRA on the 5 images, loss_diff scores of the pool, threshold_uniform among the top
200); `:full` adds oracle (the pool images of the subject's class nearest its cluster) and less
(LESS's warm-up gradients, the same rule). See jbat/diffusion/personalize.py and
docs/personalization.md. A rerun of a finished or interrupted workdir only runs what is
missing.
"""

from jbat.diffusion.personalize import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "personalize_demo"
  c.data.dataset = "fashion_mnist"
  c.data.subject_classes = "0,7,8"  # t-shirt, sneaker, bag: 2 subjects each
  # The demo: 3 subjects (the largest cluster of each class), one seed, 32 samples per metric
  # at 20 DDIM steps, a checkpoint only at the end of each 100-step adapter run, so it fits
  # 15 min cold / 5 min warm on a 2-core CPU (docs/personalization.md, "Time").
  c.data.subjects_per_class = 1
  c.seeds = "0"
  c.eval.n_samples = 32
  c.eval.sample_steps = 20
  c.train.ckpt_every = 0

  if arg == "full":  # docs/results.md: 6 subjects x 2 seeds (12 units), 50 samples, 25 steps,
    c.name = "personalize_demo_full"  # and the references oracle and less.
    c.arms = "none,prior,random,oracle,albat,less"
    c.data.subjects_per_class = 2
    c.seeds = "0,1"
    c.eval.n_samples = 50
    c.eval.sample_steps = 25
    c.train.ckpt_every = 50
  elif arg == "tiny":  # scikit-learn digits (8x8, no download), seconds on a CPU.
    c.name = "personalize_tiny"
    c.progress = False
    c.seeds = "0,1"
    c.data.dataset = "digits"
    c.data.subject_classes = "7"
    c.data.subjects_per_class = 2
    c.data.n_clusters = 3
    c.data.n_subject = 3
    c.data.n_val = 3
    c.data.n_heldout = 16
    c.data.n_drift = 16
    c.data.pool_size = 120
    c.model.widths = "8,16"
    c.model.patch = 1
    c.model.d_model = 16
    c.model.n_heads = 2
    c.backbone.steps = 20
    c.backbone.batch_size = 16
    c.backbone.warmup_steps = 2
    c.backbone.ckpt_every = 0  # only at the end (orbax saves cost ~0.5 s each)
    c.classifier.steps = 20
    c.classifier.batch_size = 32
    c.classifier.width = 4
    c.classifier.embed_dim = 8
    c.lora.rank = 2
    c.lora.alpha = 4.0
    c.train.steps = 6
    c.train.warmup_steps = 1
    c.train.subject_rows = 2
    c.train.aug_rows = 2
    c.train.ckpt_every = 0
    c.train.log_every = 3
    c.aug.k = 8
    c.surrogate.steps = 6  # = train.steps: the surrogate and `none` share one compiled step
    c.score.n_draws = 2
    c.score.batch_size = 32
    c.select.top_n = 20
    c.eval.n_draws = 2
    c.eval.batch_size = 16
    c.eval.n_samples = 4
    c.eval.n_backbone_samples = 4
    c.eval.sample_steps = 3
    c.eval.gen_batch = 8
  elif arg:
    raise ValueError(f"configs/personalize_demo.py: unknown variant {arg!r} (known: full, tiny)")
  return c
