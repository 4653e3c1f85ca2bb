"""llama.cpp GGUF files -> `CausalLM`: metadata, de-quantization, tensor names, Q/K un-permutation.

Only the `llama` architecture (Llama, SmolLM, TinyLlama, Mistral-style files) is read. A GGUF
file holds key/value metadata (`llama.block_count`, `llama.attention.head_count`, ...,
`tokenizer.ggml.*`) and tensors in ggml order; the `gguf` package's reader gives each tensor as a
row-major numpy array whose shape is the ggml shape reversed, i.e. the Hugging Face [out, in]
layout, quantized types as raw blocks that `gguf.dequantize` turns into float32.

  ours                                 GGUF
  embed.embedding                      token_embd.weight              [V, D]
  layers.i.attn_norm.scale             blk.i.attn_norm.weight
  layers.i.attn.{q,k,v,o}_proj.kernel  blk.i.attn_{q,k,v,output}.weight  (transposed, [out, in])
  layers.i.mlp_norm.scale              blk.i.ffn_norm.weight
  layers.i.mlp.{gate,up,down}_proj     blk.i.ffn_{gate,up,down}.weight   (transposed)
  final_norm.scale                     output_norm.weight
  lm_head.kernel (untied only)         output.weight                  (absent: tied embeddings)

Rotary attention. HF Llama rotates the pair (i, i + Dh/2) of each head (`rotate_half`); ggml's
llama rope rotates adjacent pairs (2i, 2i + 1). llama.cpp's converter therefore permutes the
rows of attn_q (per query head) and attn_k (per kv head): the row r = 2i + j of a head (j in
{0, 1}) holds the HF row j * Dh/2 + i. `unpermute_rows` undoes it.

The tokenizer is built by transformers from the file's `tokenizer.ggml.*` metadata
(`AutoTokenizer.from_pretrained(folder, gguf_file=name)`; nothing is downloaded).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

from jbat.errors import JbatError
from jbat.models import weights
from jbat.models.causal_lm import CausalLM, LMConfig, storage_dtype

SUPPORTED_ARCHITECTURES = ("llama",)
# ggml types `read_tensor` de-quantizes (names of gguf.GGMLQuantizationType members).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

Sharding = weights.Sharding


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - gguf is in requirements.lock
    raise JbatError("reading .gguf files needs the `gguf` package (pip install gguf)") from e
  return gguf


def open_gguf(path: str | os.PathLike):
  """A `gguf.GGUFReader` over `path` (memory-mapped: tensors are read when touched).

  Raises JbatError when the file is missing or not a GGUF file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise JbatError(f"{path}: no such GGUF file")
  try:
    return _gguf().GGUFReader(str(path))
  except (ValueError, OSError, KeyError) as e:
    raise JbatError(f"{path}: not a readable GGUF file ({e})") from e


def metadata(reader) -> dict:
  """{key: value} of the file's metadata (strings decoded; arrays as lists). Large token lists
  are read too, so call this once."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    out[key] = field.contents()
  return out


def config_from_gguf(meta: dict, has_output: bool, dtype: str = "float32",
                     where: str = "gguf") -> LMConfig:
  """The `LMConfig` of a llama-architecture GGUF file from its metadata.

  `has_output`: whether the file holds `output.weight` (else the embeddings are tied). Raises
  JbatError for another architecture, a missing key or rope scaling other than none/linear.
  """
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise JbatError(f"{where}: GGUF architecture {arch!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  get = lambda k, default=None: meta.get(f"{arch}.{k}", default)
  try:
    n_heads = int(get("attention.head_count"))
    d = int(get("embedding_length"))
    vocab = get("vocab_size")
    if vocab is None:
      vocab = len(meta["tokenizer.ggml.tokens"])
    scaling = None
    kind = get("rope.scaling.type", "none")
    if kind == "linear":
      scaling = ("linear", float(get("rope.scaling.factor")))
    elif kind not in ("none", None):
      raise JbatError(f"{where}: rope scaling {kind!r} is not supported (none, linear)")
    head_dim = int(get("attention.key_length", get("rope.dimension_count", d // n_heads)))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
      raise JbatError(f"{where}: partial rotary embeddings are not supported")
    cfg = LMConfig(
        vocab_size=int(vocab), max_len=int(get("context_length", 2048)), d_model=d,
        n_layers=int(get("block_count")), n_heads=n_heads, d_ff=int(get("feed_forward_length")),
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim, pos="rope",
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling, norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), mlp="swiglu",
        tie_embeddings=not has_output, qkv_bias=False, bias=False, dtype=dtype)
  except (KeyError, TypeError, ValueError) as e:
    raise JbatError(f"{where}: missing or bad llama metadata ({e!r})") from e
  cfg.validate()
  return cfg


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's rotary row permutation of a [heads * Dh, ...] q or k weight: within
  each head, row 2i + j (ggml's adjacent pairs) goes back to row j * Dh/2 + i (HF's halves)."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensor(tensor, where: str = "gguf") -> np.ndarray:
  """float32 numpy array (HF layout, [out, in] for linears) of one `gguf.ReaderTensor`.

  Raises JbatError naming the tensor and its type for a type outside SUPPORTED_TYPES."""
  gguf = _gguf()
  kind = gguf.GGMLQuantizationType(tensor.tensor_type).name
  if kind not in SUPPORTED_TYPES:
    raise JbatError(f"{where}: tensor {tensor.name!r} has ggml type {kind}, which jbat does not "
                    f"de-quantize (supported: {', '.join(SUPPORTED_TYPES)})")
  x = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return x.reshape(shape)


def tensor_names(cfg: LMConfig) -> list[tuple[str, str, bool]]:
  """[(GGUF tensor name, our dotted parameter path, transpose)] for a llama `cfg`."""
  out = [("token_embd.weight", "embed.embedding", False)]
  lin = [("attn_q", "attn.q_proj"), ("attn_k", "attn.k_proj"), ("attn_v", "attn.v_proj"),
         ("attn_output", "attn.o_proj"), ("ffn_gate", "mlp.gate_proj"),
         ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]
  for i in range(cfg.n_layers):
    out += [(f"blk.{i}.attn_norm.weight", f"layers.{i}.attn_norm.scale", False),
            (f"blk.{i}.ffn_norm.weight", f"layers.{i}.mlp_norm.scale", False)]
    out += [(f"blk.{i}.{g}.weight", f"layers.{i}.{o}.kernel", True) for g, o in lin]
  out.append(("output_norm.weight", "final_norm.scale", False))
  if not cfg.tie_embeddings:
    out.append(("output.weight", "lm_head.kernel", True))
  return out


def iter_params(reader, cfg: LMConfig, where: str = "gguf") -> Iterator[tuple[str, np.ndarray]]:
  """Yields (our dotted param path, float32 array in our layout), one tensor at a time.

  Raises JbatError naming a missing tensor or one whose shape differs from the metadata's."""
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    raise JbatError(f"{where}: per-dimension rope frequencies (rope_freqs.weight, Llama 3.1 "
                    f"scaling) are not supported")
  params = _shapes(cfg)
  for name, ours, transpose in tensor_names(cfg):
    if name not in tensors:
      raise JbatError(f"{where}: tensor {name!r} is missing from the GGUF file")
    x = read_tensor(tensors[name], where)
    if transpose:
      want_hf = tuple(reversed(params[ours]))
    else:
      want_hf = params[ours]
    if x.shape != want_hf:
      raise JbatError(f"{where}: tensor {name!r} has shape {x.shape}, expected {want_hf} from the "
                      f"metadata")
    if ".attn_q." in name:
      x = unpermute_rows(x, cfg.n_heads)
    elif ".attn_k." in name:
      x = unpermute_rows(x, cfg.kv_heads)
    yield ours, np.ascontiguousarray(x.T if transpose else x)


def _shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
  abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  return {".".join(str(p) for p in path): tuple(v.shape)
          for path, v in nnx.to_flat_state(nnx.state(abstract))}


def load_tokenizer(path: pathlib.Path):
  """The HF fast tokenizer transformers builds from the GGUF metadata; pad falls back to eos
  (and bos to eos) as in `jbat.data.tokenizer.load_tokenizer`."""
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise JbatError(f"{path}: transformers cannot build a tokenizer from the GGUF metadata "
                    f"({e})") from e
  if tok.eos_token is None:
    raise JbatError(f"{path}: the GGUF tokenizer defines no eos token")
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  if tok.bos_token is None:
    tok.bos_token = tok.eos_token
  return tok


def load_gguf(path: str | os.PathLike, dtype: str = "float32", *,
              mesh: jax.sharding.Mesh | None = None,
              sharding: Sharding | None = None,
              param_dtype: str = "float32") -> tuple[CausalLM, object]:
  """(CausalLM, tokenizer) from a llama-architecture `.gguf` file; see `hf_io.load_causal_lm`
  for `dtype`, `mesh`, `sharding` and `param_dtype`. Tensors are de-quantized to float32 one
  at a time, cast to `param_dtype` and placed straight onto their sharding.

  Raises:
    JbatError: missing/unreadable file, another architecture, unsupported rope scaling, a
      tensor type outside SUPPORTED_TYPES, a missing or misshapen tensor, a tokenizer larger
      than the embedding.
  """
  store = storage_dtype(param_dtype)
  path = pathlib.Path(path)
  reader = open_gguf(path)
  meta = metadata(reader)
  has_output = any(t.name == "output.weight" for t in reader.tensors)
  cfg = config_from_gguf(meta, has_output, dtype, where=str(path))
  tokenizer = load_tokenizer(path)
  if len(tokenizer) > cfg.vocab_size:
    raise JbatError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's "
                    f"embedding has only {cfg.vocab_size} rows")
  model = weights.assemble(cfg, iter_params(reader, cfg, where=str(path)), store=store,
                           mesh=mesh, sharding=sharding, where=str(path))
  return model, tokenizer
