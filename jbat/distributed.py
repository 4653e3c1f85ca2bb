"""Multi-process runs through JAX's own distributed runtime: one code path from a laptop to a pod.

Every process runs the same program (SPMD). `initialize` starts `jax.distributed` when the run
has more than one process, from (first match wins):
  1. the config: `distributed.coordinator` ("host:port"), `distributed.num_processes`,
     `distributed.process_id`;
  2. the environment: JBAT_COORDINATOR, JBAT_NUM_PROCESSES, JBAT_PROCESS_ID (GPU clusters
     without a scheduler JAX knows, and local multi-process tests);
  3. auto-detection by `jax.distributed.initialize()` on Cloud TPU pods and SLURM / Open MPI
     jobs (`distributed.auto = True`, or JBAT_DISTRIBUTED=auto).
Nothing set: a single process, and nothing is initialised.

On CPU the cross-process collectives use gloo (`jax_cpu_collectives_implementation`), so the
same tests run on a laptop. After initialisation `jax.devices()` lists the devices of every
process; meshes are built over all of them (`make_mesh`).

Rules the pipeline follows (see README "Run on a TPU pod / several GPUs"):
  * every process calls every jitted function with the same global shapes (lockstep);
  * each process feeds only its rows of a global batch (`local_rows`,
    `jax.make_array_from_process_local_data`);
  * files are written by process 0 only (`is_main`), into a workdir all processes can read
    (a shared file system or a bucket path orbax accepts); `barrier` before others read them;
  * orbax checkpoints are saved by all processes together (orbax coordinates them).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jbat.errors import JbatError

ENV_COORDINATOR = "JBAT_COORDINATOR"
ENV_NUM_PROCESSES = "JBAT_NUM_PROCESSES"
ENV_PROCESS_ID = "JBAT_PROCESS_ID"
ENV_AUTO = "JBAT_DISTRIBUTED"


def _setting(config: Any, key: str, env: str, empty: Any) -> Any:
  value = getattr(config, key, empty) if config is not None else empty
  if value != empty:
    return value
  return os.environ.get(env, empty)


def initialize(config: Any = None) -> dict[str, int]:
  """Starts `jax.distributed` if this run has several processes; returns {process_index,
  process_count}. Idempotent. `config` is the `distributed` section of a jbat config (or None).

  Raises:
    JbatError: an incomplete or inconsistent setting (names the config field or variable).
  """
  if jax.distributed.is_initialized():
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}
  coordinator = str(_setting(config, "coordinator", ENV_COORDINATOR, ""))
  num = int(_setting(config, "num_processes", ENV_NUM_PROCESSES, 0) or 0)
  pid = int(_setting(config, "process_id", ENV_PROCESS_ID, -1))
  auto = bool(getattr(config, "auto", False)) or os.environ.get(ENV_AUTO, "") == "auto"
  if coordinator or num > 1:
    if not coordinator or num < 1 or not 0 <= pid < num:
      raise JbatError(
          f"distributed: need a coordinator 'host:port', num_processes >= 1 and 0 <= process_id "
          f"< num_processes (config distributed.* or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, "
          f"${ENV_PROCESS_ID}); got coordinator={coordinator!r}, num_processes={num}, "
          f"process_id={pid}")
    _cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=pid)
  elif auto:
    _cpu_collectives()
    jax.distributed.initialize()  # TPU pods, SLURM, Open MPI: JAX finds the cluster itself.
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def _cpu_collectives() -> None:
  """Cross-process collectives on CPU devices need an implementation (gloo ships with jaxlib)."""
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_main() -> bool:
  """True on process 0, the only process that writes files and prints progress."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def make_mesh(model: int = 1, devices: list | None = None) -> jax.sharding.Mesh:
  """A mesh over all global devices: axes ("data",), or ("data", "model") when model > 1.

  Devices are in `jax.devices()` order (grouped by process), so process p owns a contiguous
  block of the `data` axis and feeds the matching rows of every global batch (`local_rows`).
  """
  devices = list(devices if devices is not None else jax.devices())
  if model < 1 or len(devices) % model:
    raise JbatError(f"mesh.model: {model} must be >= 1 and divide the {len(devices)} devices")
  if model == 1:
    return jax.sharding.Mesh(np.asarray(devices), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
  grid = np.asarray(devices).reshape(len(devices) // model, model)
  return jax.sharding.Mesh(grid, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def local_rows(global_rows: int, mesh: jax.sharding.Mesh) -> slice:
  """The rows of a global batch that this process feeds, for batches split over `data`.

  Raises JbatError if the rows are not divisible by the `data` axis or this process's rows
  are not contiguous (a mesh not in process order).
  """
  n_data = mesh.shape["data"]
  if global_rows % n_data:
    raise JbatError(f"a global batch of {global_rows} rows does not split over {n_data} "
                    f"devices of the mesh's data axis")
  sharding = NamedSharding(mesh, P("data"))
  spans = {(idx[0].start or 0, global_rows if idx[0].stop is None else idx[0].stop)
           for idx in sharding.addressable_devices_indices_map((global_rows,)).values()}
  lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
  if sum(e - s for s, e in spans) != hi - lo:
    raise JbatError("mesh: this process's devices are not contiguous on the data axis; build "
                    "the mesh with jbat.distributed.make_mesh")
  return slice(lo, hi)


def host_array(x: jax.Array) -> np.ndarray:
  """A global array as numpy on every process (gathers other processes' shards if needed)."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put_global(tree: Any, mesh: jax.sharding.Mesh, spec_fn=None) -> Any:
  """Places a pytree whose value is the same on every process on the mesh.

  `spec_fn(leaf) -> PartitionSpec` (default: P(), replicated). With one process this is
  `jax.device_put`; with several, each process supplies its own shards of the (identical)
  host value through `jax.make_array_from_callback`.
  """
  def put(x):
    spec = P() if spec_fn is None else spec_fn(x)
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(x) if not isinstance(x, jax.Array) else host_array(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree.map(put, tree)


def model_spec(mesh: jax.sharding.Mesh):
  """PartitionSpec rule for parameters on a mesh with a "model" axis: a leaf of rank >= 2
  is split over "model" along its last dimension when that dimension divides evenly (output
  features of Linear kernels, the model dimension of embeddings), else replicated. XLA inserts
  the collectives the matmuls then need. Without a "model" axis everything is replicated."""
  if "model" not in mesh.axis_names or mesh.shape["model"] == 1:
    return lambda x: P()
  m = mesh.shape["model"]

  def spec(x):
    shape = np.shape(x)
    if len(shape) >= 2 and shape[-1] % m == 0:
      return P(*([None] * (len(shape) - 1)), "model")
    return P()
  return spec


def place_params(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Parameters on the mesh: replicated over `data`, split over `model` (see `model_spec`)."""
  return put_global(tree, mesh, model_spec(mesh))
