"""ALBAT on a TPU pod slice (or several GPU hosts): score a large pool with a real backbone.

Every host runs the same command (JAX finds the pod itself: `distributed.auto`):

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command \\
    "cd jbat && .venv/bin/python -m jbat.train --config configs/tpu_pod.py \\
       --config.model.pretrained=/mnt/models/SmolLM-135M \\
       --config.data.path=/mnt/data/corpus.jsonl --config.data.domain=<label> \\
       --config.workdir=/mnt/shared/runs/pod1 --config.cache_dir=/mnt/shared/cache"

Several GPU hosts without a scheduler JAX knows: set distributed.* (or JBAT_COORDINATOR=host0:
1234, JBAT_NUM_PROCESSES=N, JBAT_PROCESS_ID=i) on each host instead of `auto`.

`workdir` and `cache_dir` must be one folder every host sees (NFS / Filestore / a gcsfuse
mount): process 0 writes the scores, manifest and reports, and orbax writes checkpoints from
all hosts into it. `model.pretrained` and `data.path` must exist on every host (or on the shared
folder). The defaults stop after the selection (`stop_after=select`): the manifest in
`workdir/select/<score>/selection/manifest.jsonl` is the product; drop `--config.stop_after`
to train and compare the arms on the pod too.

Sizes: bf16 compute, rematerialised blocks, global batches split over all chips (multiples of
the chip count), LoRA on the attention and MLP projections. `mesh.model` > 1 splits the
backbone over that many chips when it does not fit one.
"""

from jbat.config import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "tpu_pod"
  c.distributed.auto = True  # TPU pods / SLURM: jax.distributed.initialize() auto-detects.
  c.stop_after = "select"
  c.mesh.model = 1  # 2, 4, ...: split a backbone that does not fit one chip's memory.

  c.model.pretrained = "/mnt/models/SmolLM-135M"  # Override: a local Hugging Face folder.
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.data.source = "jsonl"
  c.data.path = "/mnt/data/corpus.jsonl"  # Override: text in "text", domain in "domain".
  c.data.text_field = "text"
  c.data.label_field = "domain"
  c.data.domain = "target"
  c.data.n_adapt = 32
  c.data.n_heldout = 256
  c.data.max_len = 512

  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.train.steps = 300
  c.train.batch_size = 64  # Global; a multiple of the chip count.
  c.train.grad_accum = 1  # Raise if the adapter batch does not fit.
  c.train.lr = 2e-4
  c.train.eval_every = 25
  c.train.ckpt_every = 25
  c.train.eval_batch_size = 256
  c.surrogate.steps = 200

  c.select.score = "rel_loss_diff"
  c.select.rule = "threshold_uniform"
  c.select.top_n = 20000
  c.select.k = 4096
  c.select.batch_size = 1024  # Global scoring batch: 1024 / chips rows per chip.
  c.select.chunk_batches = 16  # Resume point every 16k examples.
  c.arms = "albat"
  c.seeds = "0"

  if arg == "local":  # The same pipeline on this machine's devices, for a dry run.
    c.distributed.auto = False
    c.model.dtype = "float32"
    c.data.max_len = 64
    c.select.batch_size = 32
    c.train.batch_size = 8
    c.train.eval_batch_size = 32
  return c
