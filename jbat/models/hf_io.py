"""Hugging Face checkpoints <-> `CausalLM`: config mapping, tensor names, lazy sharded loading.

Supported `config.json` model types: gpt2, llama (SmolLM, TinyLlama, Llama 2/3), qwen2.

Tensor layout. Our `nnx.Linear` kernels are [in, out] (y = x W + b). HF Llama/Qwen2 store
`nn.Linear.weight` as [out, in], so they are transposed; GPT-2 stores `Conv1D.weight` as
[in, out] already, and fuses q, k, v into `c_attn` ([D, 3D], columns q | k | v). Embeddings are
[V, D] in both. Norm weights map to nnx `scale`.

  ours                                 llama / qwen2 (prefix model.)        gpt2 (prefix transformer.)
  embed.embedding                      embed_tokens.weight                  wte.weight
  pos_embed.embedding                  -                                    wpe.weight
  layers.i.attn_norm.{scale,bias}      layers.i.input_layernorm.weight      h.i.ln_1.{weight,bias}
  layers.i.attn.{q,k,v}_proj.*         layers.i.self_attn.{q,k,v}_proj.*    h.i.attn.c_attn.* (fused)
  layers.i.attn.o_proj.*               layers.i.self_attn.o_proj.*          h.i.attn.c_proj.*
  layers.i.mlp_norm.*                  layers.i.post_attention_layernorm.*  h.i.ln_2.*
  layers.i.mlp.{gate,up,down}_proj.*   layers.i.mlp.{gate,up,down}_proj.*   -
  layers.i.mlp.{fc1,fc2}.*             -                                    h.i.mlp.{c_fc,c_proj}.*
  final_norm.*                         norm.weight                          ln_f.*
  lm_head.kernel (untied only)         lm_head.weight (no prefix)           lm_head.weight

Loading reads one tensor at a time with `safetensors.safe_open` (a file is never read whole)
and places it with `jax.device_put(x, sharding)` straight onto its target sharding (replicated on
`mesh` by default, or any per-parameter sharding), so host memory holds one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

from jbat import io
from jbat.data.tokenizer import load_tokenizer
from jbat.errors import JbatError
from jbat.lora import LoRALinear
from jbat.models import weights
from jbat.models.causal_lm import CausalLM, LMConfig, storage_dtype

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

Sharding = weights.Sharding


# ---------------------------------------------------------------------------------------------
# config.json <-> LMConfig


def _rope_scaling(hf: dict, where: str) -> tuple[float, tuple | None]:
  """(rope_theta, scaling) from a llama/qwen2 config.json.

  transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}`; older files have
  top-level `rope_theta` and `rope_scaling: {rope_type | type, factor, ...}` (or null).
  scaling is None | ("linear", factor) | ("llama3", factor, low_freq_factor, high_freq_factor,
  original_max_position_embeddings).
  """
  params = dict(hf.get("rope_scaling") or {})
  params.update(hf.get("rope_parameters") or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in SUPPORTED_ROPE_TYPES:
    raise JbatError(f"{where}: rope_type {kind!r} is not supported (supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)})")
  if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
    raise JbatError(f"{where}: partial_rotary_factor != 1 is not supported")
  try:
    if kind == "linear":
      return theta, ("linear", float(params["factor"]))
    if kind == "llama3":
      return theta, ("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                     float(params["high_freq_factor"]),
                     float(params["original_max_position_embeddings"]))
  except KeyError as e:
    raise JbatError(f"{where}: rope_type {kind!r} needs the field {e.args[0]!r}") from e
  return theta, None


def config_from_hf(hf: dict, dtype: str = "float32", where: str = "config.json") -> LMConfig:
  """Maps a parsed HF `config.json` to an `LMConfig` (compute dtype `dtype`).

  Raises JbatError for an unsupported model_type (listing the supported ones) or any feature
  the jbat model does not implement (sliding windows, exact gelu, partial rope, ...).
  """
  mt = hf.get("model_type")
  if mt not in SUPPORTED_MODEL_TYPES:
    raise JbatError(f"{where}: model_type {mt!r} is not supported; supported model types: "
                    f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  try:
    if mt == "gpt2":
      act = hf.get("activation_function", "gelu_new")
      if act not in _TANH_GELUS:
        raise JbatError(f"{where}: activation_function {act!r} is not supported (jbat's GPT-2 "
                        f"uses the tanh gelu: {', '.join(_TANH_GELUS)})")
      if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise JbatError(f"{where}: only scale_attn_weights=true and "
                        f"scale_attn_by_inverse_layer_idx=false are supported")
      d = int(hf["n_embd"])
      cfg = LMConfig(
          vocab_size=int(hf["vocab_size"]), max_len=int(hf["n_positions"]), d_model=d,
          n_layers=int(hf["n_layer"]), n_heads=int(hf["n_head"]),
          d_ff=int(hf.get("n_inner") or 4 * d), pos="learned", norm="layernorm",
          norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp="gelu",
          tie_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=True, bias=True,
          dtype=dtype)
    else:
      if hf.get("hidden_act", "silu") != "silu":
        raise JbatError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported "
                        f"(expected 'silu')")
      if mt == "qwen2":
        types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in types):
          raise JbatError(f"{where}: sliding-window attention is not supported")
        qkv_bias, bias = True, False
      else:
        qkv_bias = bool(hf.get("attention_bias", False))
        bias = bool(hf.get("mlp_bias", False))
        if qkv_bias != bias:
          raise JbatError(f"{where}: attention_bias={qkv_bias} with mlp_bias={bias} is not "
                          f"supported (jbat puts o_proj's bias with the MLP's: set both equal)")
      theta, scaling = _rope_scaling(hf, where)
      n_heads = int(hf["num_attention_heads"])
      d = int(hf["hidden_size"])
      cfg = LMConfig(
          vocab_size=int(hf["vocab_size"]), max_len=int(hf.get("max_position_embeddings", 2048)),
          d_model=d, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
          d_ff=int(hf["intermediate_size"]),
          n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
          head_dim=int(hf.get("head_dim") or d // n_heads), pos="rope", rope_theta=theta,
          norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
          tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
          bias=bias, dtype=dtype, rope_scaling=scaling)
  except KeyError as e:
    raise JbatError(f"{where}: missing field {e.args[0]!r} for model_type {mt!r}") from e
  except (TypeError, ValueError) as e:
    raise JbatError(f"{where}: bad value for model_type {mt!r} ({e})") from e
  cfg.validate()
  return cfg


def infer_model_type(cfg: LMConfig) -> str:
  """The HF family that can express `cfg`: gpt2 (learned positions), qwen2 (q/k/v bias only),
  else llama."""
  if cfg.pos == "learned":
    return "gpt2"
  return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"


def config_to_hf(cfg: LMConfig, model_type: str) -> dict:
  """The `config.json` dict transformers reads back as the same architecture.

  Raises JbatError if `model_type` cannot express `cfg` (e.g. rope in gpt2, GQA in gpt2).
  """
  where = f"save_causal_lm(model_type={model_type!r})"
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise JbatError(f"{where}: supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
  if model_type == "gpt2":
    ok = (cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu"
          and cfg.qkv_bias and cfg.bias and cfg.kv_heads == cfg.n_heads
          and cfg.dh * cfg.n_heads == cfg.d_model)
    if not ok:
      raise JbatError(f"{where}: gpt2 needs learned positions, layernorm, gelu MLP, all biases, "
                      f"no GQA and head_dim = d_model / n_heads; got {cfg}")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None, "eos_token_id": None, "dtype": "float32"}
  ok = cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"
  ok = ok and ((cfg.qkv_bias and not cfg.bias) if model_type == "qwen2"
               else cfg.qkv_bias == cfg.bias)
  if not ok:
    raise JbatError(f"{where}: {model_type} needs rope, rmsnorm, swiglu and "
                    f"{'q/k/v bias only' if model_type == 'qwen2' else 'qkv_bias == bias'}; "
                    f"got {cfg}")
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  scaling = getattr(cfg, "rope_scaling", None)
  if scaling is not None and scaling[0] == "linear":
    rope.update(rope_type="linear", factor=scaling[1])
  elif scaling is not None:
    rope.update(rope_type="llama3", factor=scaling[1], low_freq_factor=scaling[2],
                high_freq_factor=scaling[3], original_max_position_embeddings=int(scaling[4]))
  hf = {
      "architectures": ["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"],
      "model_type": model_type, "vocab_size": cfg.vocab_size,
      "max_position_embeddings": cfg.max_len, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.dh, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
      "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None, "dtype": "float32"}
  if model_type == "llama":
    hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.bias)
  else:
    hf.update(use_sliding_window=False, sliding_window=None,
              layer_types=["full_attention"] * cfg.n_layers)
  return hf


# ---------------------------------------------------------------------------------------------
# Tensor names


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor `name` of shape `hf_shape` = concat over `parts` (along the last axis) of our
  parameters (dotted paths), each transposed first when `transpose` (HF [out, in] linears)."""

  name: str
  hf_shape: tuple[int, ...]
  parts: tuple[str, ...]
  transpose: bool = False


def tensor_entries(cfg: LMConfig, model_type: str, prefix: str | None = None) -> list[Entry]:
  """All HF tensors of `cfg` in `model_type` layout (`prefix`: "transformer." / "model." by
  default; some original GPT-2 files use "")."""
  d, v, f, l = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.n_layers
  qd, kd = cfg.n_heads * cfg.dh, cfg.kv_heads * cfg.dh
  out: list[Entry] = []
  if model_type == "gpt2":
    p = "transformer." if prefix is None else prefix
    out += [Entry(f"{p}wte.weight", (v, d), ("embed.embedding",)),
            Entry(f"{p}wpe.weight", (cfg.max_len, d), ("pos_embed.embedding",))]
    for i in range(l):
      h, o = f"{p}h.{i}.", f"layers.{i}."
      qkv = tuple(f"{o}attn.{n}_proj" for n in "qkv")
      out += [Entry(f"{h}ln_1.weight", (d,), (f"{o}attn_norm.scale",)),
              Entry(f"{h}ln_1.bias", (d,), (f"{o}attn_norm.bias",)),
              Entry(f"{h}attn.c_attn.weight", (d, 3 * d), tuple(f"{q}.kernel" for q in qkv)),
              Entry(f"{h}attn.c_attn.bias", (3 * d,), tuple(f"{q}.bias" for q in qkv)),
              Entry(f"{h}attn.c_proj.weight", (d, d), (f"{o}attn.o_proj.kernel",)),
              Entry(f"{h}attn.c_proj.bias", (d,), (f"{o}attn.o_proj.bias",)),
              Entry(f"{h}ln_2.weight", (d,), (f"{o}mlp_norm.scale",)),
              Entry(f"{h}ln_2.bias", (d,), (f"{o}mlp_norm.bias",)),
              Entry(f"{h}mlp.c_fc.weight", (d, f), (f"{o}mlp.fc1.kernel",)),
              Entry(f"{h}mlp.c_fc.bias", (f,), (f"{o}mlp.fc1.bias",)),
              Entry(f"{h}mlp.c_proj.weight", (f, d), (f"{o}mlp.fc2.kernel",)),
              Entry(f"{h}mlp.c_proj.bias", (d,), (f"{o}mlp.fc2.bias",))]
    out += [Entry(f"{p}ln_f.weight", (d,), ("final_norm.scale",)),
            Entry(f"{p}ln_f.bias", (d,), ("final_norm.bias",))]
  else:
    p = "model." if prefix is None else prefix
    out.append(Entry(f"{p}embed_tokens.weight", (v, d), ("embed.embedding",)))
    for i in range(l):
      h, o = f"{p}layers.{i}.", f"layers.{i}."
      lin = [("self_attn.q_proj", "attn.q_proj", qd, d, cfg.qkv_bias),
             ("self_attn.k_proj", "attn.k_proj", kd, d, cfg.qkv_bias),
             ("self_attn.v_proj", "attn.v_proj", kd, d, cfg.qkv_bias),
             ("self_attn.o_proj", "attn.o_proj", d, qd, cfg.bias),
             ("mlp.gate_proj", "mlp.gate_proj", f, d, cfg.bias),
             ("mlp.up_proj", "mlp.up_proj", f, d, cfg.bias),
             ("mlp.down_proj", "mlp.down_proj", d, f, cfg.bias)]
      out += [Entry(f"{h}input_layernorm.weight", (d,), (f"{o}attn_norm.scale",)),
              Entry(f"{h}post_attention_layernorm.weight", (d,), (f"{o}mlp_norm.scale",))]
      for hf_name, ours, n_out, n_in, has_bias in lin:
        out.append(Entry(f"{h}{hf_name}.weight", (n_out, n_in), (f"{o}{ours}.kernel",), True))
        if has_bias:
          out.append(Entry(f"{h}{hf_name}.bias", (n_out,), (f"{o}{ours}.bias",)))
    out.append(Entry(f"{p}norm.weight", (d,), ("final_norm.scale",)))
  if not cfg.tie_embeddings:
    out.append(Entry("lm_head.weight", (v, d), ("lm_head.kernel",), True))
  return out


# ---------------------------------------------------------------------------------------------
# Reading safetensors lazily


class _Checkpoint:
  """name -> (file, shape) over one `model.safetensors` or the shards of an index; `read(name)`
  loads that one tensor as float32 numpy (bf16 goes through a host-CPU jax array)."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    index = root / "model.safetensors.index.json"
    single = root / "model.safetensors"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise JbatError(f"{index}: not a safetensors index (expected a 'weight_map')") from e
      files = sorted(set(weight_map.values()))
      for fname in files:
        if not (root / fname).is_file():
          raise JbatError(f"{index}: names shard {fname!r}, which is missing from {root}")
      self.file_of = {k: root / fn for k, fn in weight_map.items()}
    elif single.is_file():
      self.file_of = None
      files = ["model.safetensors"]
    else:
      raise JbatError(f"{root}: no model.safetensors or model.safetensors.index.json")
    self._handles = {}
    for fname in files:
      try:
        self._handles[root / fname] = safetensors.safe_open(str(root / fname), framework="numpy")
      except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers.
        raise JbatError(f"{root / fname}: cannot read as safetensors ({e})") from e
    if self.file_of is None:
      self.file_of = {k: root / files[0] for k in self._handles[root / files[0]].keys()}

  def has(self, name: str) -> bool:
    return name in self.file_of

  def _handle(self, name: str):
    handle = self._handles[self.file_of[name]]
    if name not in handle.keys():
      raise JbatError(f"{self.file_of[name]}: tensor {name!r} listed in the index is not in "
                      f"the shard")
    return handle

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    handle = self._handle(name)
    if handle.get_slice(name).get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
      with jax.default_device(jax.devices("cpu")[0]):
        flax_handle = safetensors.safe_open(str(self.file_of[name]), framework="flax")
        return np.asarray(flax_handle.get_tensor(name).astype(np.float32))
    return np.asarray(handle.get_tensor(name), dtype=np.float32)


def _gpt2_prefix(ckpt: _Checkpoint) -> str:
  """Files written by transformers use "transformer.", the original OpenAI files no prefix."""
  return "" if not ckpt.has("transformer.wte.weight") and ckpt.has("wte.weight") else "transformer."


def iter_params(ckpt_dir: str | os.PathLike, cfg: LMConfig,
                model_type: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (our dotted param path, float32 host array in our layout), one HF tensor at a time.

  Raises JbatError naming the tensor when it is missing or its shape differs from what `cfg`
  implies (message gives both shapes).
  """
  ckpt = _Checkpoint(pathlib.Path(ckpt_dir))
  prefix = _gpt2_prefix(ckpt) if model_type == "gpt2" else None
  for e in tensor_entries(cfg, model_type, prefix):
    if not ckpt.has(e.name):
      raise JbatError(f"{ckpt_dir}: tensor {e.name!r} is missing from the checkpoint")
    got = ckpt.shape(e.name)
    if got != e.hf_shape:
      raise JbatError(f"{ckpt_dir}: tensor {e.name!r} has shape {got}, expected {e.hf_shape} "
                      f"from config.json")
    x = ckpt.read(e.name)
    if e.transpose:
      x = x.T
    for path, piece in zip(e.parts, np.split(x, len(e.parts), axis=-1)):
      yield path, np.ascontiguousarray(piece)


# ---------------------------------------------------------------------------------------------
# Public API


def read_config(folder: str | os.PathLike, dtype: str = "float32") -> tuple[LMConfig, dict]:
  """(LMConfig, the parsed config.json) of a Hugging Face model folder, without its weights;
  JbatError naming the file when it is missing, not JSON or not a supported architecture."""
  config_file = pathlib.Path(folder) / "config.json"
  if not config_file.is_file():
    raise JbatError(f"{folder}: no config.json (expected a Hugging Face model folder)")
  try:
    hf = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise JbatError(f"{config_file}: not valid JSON ({e})") from e
  return config_from_hf(hf, dtype, where=str(config_file)), hf


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32", *,
                   mesh: jax.sharding.Mesh | None = None,
                   sharding: Sharding | None = None,
                   param_dtype: str = "float32") -> tuple[CausalLM, object]:
  """Loads a local Hugging Face model directory as (CausalLM, tokenizer).

  Args:
    path: folder with config.json (model_type gpt2 | llama | qwen2), model.safetensors or
      model.safetensors.index.json + shards, and an HF tokenizer; or a llama.cpp `.gguf`
      file (llama architecture, de-quantized to float32: see `jbat.models.gguf_io`).
    dtype: compute dtype of the jbat model ("float32" | "bfloat16"); parameters are float32.
    mesh: parameters are placed replicated on it (NamedSharding(mesh, P())); default: the
      first device.
    sharding: optional `(param_path, shape) -> Sharding` overriding the placement per
      parameter (e.g. to shard a model too large for one device).
    param_dtype: storage dtype of the loaded weights, "float32" (default) or "bfloat16"
      (half the memory; each tensor is cast on the host before it is placed). The modules
      cast weights to `dtype` for compute, so with dtype="bfloat16" both give the same logits.

  Nothing is downloaded. The model is never materialised at random: its abstract shapes come
  from `nnx.eval_shape` and each tensor goes straight from the file to its sharding.

  Raises:
    JbatError: missing folder/config, unsupported model type or feature, missing tensor,
      wrong tensor shape, index naming a missing shard, tokenizer vocabulary larger than the
      embedding rows.
  """
  root = pathlib.Path(path)
  if root.suffix == ".gguf":
    from jbat.models import gguf_io  # pylint: disable=import-outside-toplevel
    loaded = gguf_io.load_gguf(root, dtype, mesh=mesh, sharding=sharding,
                               param_dtype=param_dtype)
    io.release_host_memory()  # The de-quantization's temporaries.
    return loaded
  cfg, hf = read_config(root, dtype)
  model_type = hf["model_type"]
  store = storage_dtype(param_dtype)

  tokenizer = load_tokenizer(root)
  if len(tokenizer) > cfg.vocab_size:
    raise JbatError(f"{root}: the tokenizer has {len(tokenizer)} tokens but the model's "
                    f"embedding has only {cfg.vocab_size} rows (config.json vocab_size)")

  model = weights.assemble(cfg, iter_params(root, cfg, model_type), store=store, mesh=mesh,
                           sharding=sharding, where=str(root))
  io.release_host_memory()  # The host copies of the tensors.
  return model, tokenizer


def hf_state_dict(model: CausalLM, model_type: str) -> dict[str, np.ndarray]:
  """{HF tensor name: float32 numpy array in HF layout} for `model` (no LoRA wrappers)."""
  if any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model)):
    raise JbatError("save_causal_lm: the model has LoRA adapters; merge them first "
                    "(jbat.peft_io.export_merged or jbat.lora.merge_into_base)")
  ours = {weights.path_str(p): np.asarray(v[...], dtype=np.float32)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  out = {}
  for e in tensor_entries(model.cfg, model_type):
    x = np.concatenate([ours[p] for p in e.parts], axis=-1)
    out[e.name] = np.ascontiguousarray(x.T if e.transpose else x)
  return out


def save_causal_lm(model: CausalLM, tokenizer, path: str | os.PathLike,
                   model_type: str | None = None) -> pathlib.Path:
  """Writes `path`/config.json + model.safetensors (+ tokenizer files when `tokenizer` is not
  None) in the layout `transformers.AutoModelForCausalLM.from_pretrained` and `load_causal_lm`
  read. `model_type` defaults to `infer_model_type(model.cfg)`. Returns the folder."""
  cfg = model.cfg
  model_type = model_type or infer_model_type(cfg)
  hf = config_to_hf(cfg, model_type)
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    token_id = getattr(tokenizer, key, None) if tokenizer is not None else None
    if isinstance(token_id, int):
      hf[key] = token_id
  tensors = hf_state_dict(model, model_type)
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  with io.atomic_path(root / "model.safetensors") as tmp:
    safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
  io.write_json_atomic(root / "config.json", hf)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(root))
  return root
