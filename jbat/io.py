"""Small file helpers shared by every stage: atomic writes, JSONL, pytrees as safetensors.

Every writer goes through a temporary name and `os.replace`, so an interrupted run never leaves
a half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import safetensors.numpy


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path next to `path`; renames it to `path` if the block succeeds.

  The temporary name is unique to this call (pid and a random suffix), so runs on several
  machines writing the same entry of a shared cache never write into one temporary file; a
  reader sees the old entry or the whole new one, never a part.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
  """Holds an exclusive `flock` on `path` (created if needed) for the block, waiting for
  another process that holds it: e.g. two runs that would fill the same cache entry. The OS
  drops the lock when its process dies. `enabled=False`: a no-op (multi-process runs, whose
  processes must not wait for each other)."""
  if not enabled:
    yield
    return
  import fcntl
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def release_host_memory() -> None:
  """Hands freed host memory back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

  glibc keeps freed blocks in its heap, and after a large block is freed it raises its mmap
  threshold, so later large temporaries (de-quantizing a GGUF tensor, a scoring chunk's host
  copies) also land in the heap and stay resident after they are freed: a whole-run peak RSS
  then holds every phase's garbage. Called between phases (after loading a model, after an
  arm); costs a few milliseconds."""
  import ctypes  # pylint: disable=import-outside-toplevel
  import gc  # pylint: disable=import-outside-toplevel
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to do.
    pass


_TRIM_LISTENER: list = []  # The registered listener (one per process).


def release_memory_after_compiles(min_seconds: float = 0.05) -> None:
  """From now on, hands freed host memory back to the OS after each XLA compilation (or load
  from the compilation cache) that took at least `min_seconds`. Idempotent.

  Compiling a program of the 30 unrolled layers of a 135M model allocates a few hundred MB on
  the host (LLVM, the HLO passes) and frees it at the end; glibc keeps most of it in its heap,
  so each compile stacks its garbage under the next phase's peak. `malloc_trim` right after
  it costs milliseconds (measured: a SmolLM2 train step's compile leaves 760 MB, 360 MB of it
  given back). Short compiles (eager ops) are skipped."""
  if _TRIM_LISTENER:
    return
  import ctypes  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  try:
    trim = ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to do.
    return
  try:  # jax's name for the event (private); its value in jax 0.10 otherwise.
    from jax._src.dispatch import BACKEND_COMPILE_EVENT as event
  except ImportError:
    event = "/jax/core/compile/backend_compile_duration"

  def listener(name: str, seconds: float, **_) -> None:
    if name == event and seconds >= min_seconds:
      trim(0)

  jax.monitoring.register_event_duration_secs_listener(listener)
  _TRIM_LISTENER.append(listener)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, finite: bool = False) -> None:
  """Writes `obj` as JSON; with `finite`, refuses (JbatError naming the key) any NaN or
  infinite number instead of writing it (results files must hold only real numbers)."""
  if finite:
    bad = first_non_finite(obj)
    if bad is not None:
      from jbat.errors import JbatError
      raise JbatError(f"{path}: not written: non-finite value at {bad} (a diverged run?)")
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def first_non_finite(obj: Any, where: str = "") -> str | None:
  """The key path ("arms.none.best_nll[0]") of the first NaN or infinite float in a JSON-like
  value, or None."""
  if isinstance(obj, dict):
    items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
  elif isinstance(obj, (list, tuple)):
    items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
  elif isinstance(obj, (float, np.floating)):
    return None if np.isfinite(obj) else (where or "<top>")
  else:
    return None
  for key, value in items:
    bad = first_non_finite(value, key)
    if bad is not None:
      return bad
  return None


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        break  # A line cut by a kill: everything after it is dropped.
  return out


def truncate_jsonl(path: str | os.PathLike, keep: Callable[[dict], bool]) -> list[dict[str, Any]]:
  """Rewrites `path` keeping only the records for which `keep` is true; returns them."""
  records = [r for r in read_jsonl(path) if keep(r)]
  write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
  return records


def tree_to_flat(tree: Any) -> dict[str, np.ndarray]:
  """Flattens a pytree (e.g. an nnx.State) to {"layers.0.attn.q_proj.kernel": array}."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path, simple=True, separator=".")
    key = key.removesuffix(".value")
    flat[key] = np.asarray(jax.device_get(leaf))
  return flat


def flat_to_tree(flat: dict[str, np.ndarray], like: Any, where: str = "") -> Any:
  """Inverse of `tree_to_flat`, onto the structure of `like`; checks names and shapes."""
  from jbat.errors import JbatError
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
  leaves = []
  for path, leaf in leaves_with_path:
    key = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
    if key not in flat:
      raise JbatError(f"{where}: missing tensor {key!r}")
    if tuple(flat[key].shape) != tuple(leaf.shape):
      raise JbatError(f"{where}: tensor {key!r} has shape {tuple(flat[key].shape)}, "
                      f"expected {tuple(leaf.shape)}")
    leaves.append(flat[key].astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def save_tree(tree: Any, path: str | os.PathLike) -> None:
  """Saves a pytree of arrays as one safetensors file (atomically)."""
  with atomic_path(path) as tmp:
    safetensors.numpy.save_file(tree_to_flat(tree), str(tmp))


def hash_tree(h: Any, tree: Any) -> None:
  """Feeds a pytree's content (leaf names and bytes, in name order) to a hashlib object."""
  for name, value in sorted(tree_to_flat(tree).items()):
    h.update(name.encode())
    h.update(np.ascontiguousarray(value).tobytes())


def load_tree(path: str | os.PathLike, like: Any) -> Any:
  return flat_to_tree(safetensors.numpy.load_file(str(path)), like, where=str(path))
