"""Export LoRA adapters for the `peft` library, and merged full weights in Hugging Face layout.

jbat's LoRALinear computes  y = x W + b + (alpha / r) (x A) B  with A: [in, r], B: [r, out].
peft's LoRA layer computes  y = base(x) + (lora_alpha / r) * lora_B(lora_A(x)), whose weights
are lora_A.weight = A^T: [r, in] and lora_B.weight = B^T: [out, r]; the scale is the same
alpha / r (use_rslora = false), so the export is a transpose and a rename:

  layers.i.attn.q_proj.lora_a  ->  base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight

GPT-2 fuses q, k, v into one Conv1D `c_attn` ([D, 3D], columns q | k | v). Separate LoRAs on the
targeted subset S of {q, k, v} (rank r each) are exactly one LoRA on c_attn of rank r |S|:

  A_c = [A_q | A_k | A_v]  ([D, r|S|]),   B_c = blockdiag(B_q, B_k, B_v)  ([r|S|, 3D]),

with zero columns of B_c for an untargeted projection; its peft rank r|S| and lora_alpha
alpha |S| (set per module through rank_pattern / alpha_pattern) keep the scale alpha / r.

DoRA (`jbat.lora.DoRALinear`) exports with `use_dora: true` and each module's magnitude m
([out], peft's `lora_magnitude_vector`). peft's DoRA output is
base(x) + (g - 1) (x W) + g * scale * lora_B(lora_A(x)), g = m / ||W + scale B A||_row, the same
function. On GPT-2's c_attn the magnitude is [m_q | m_k | m_v]; an untargeted projection gets
its columns' norms ||W||_c (g = 1), and the block-diagonal B_c keeps each column's norm that of
its own projection, so the fused DoRA is exact too.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re

import numpy as np
import safetensors.numpy
from flax import nnx

from jbat import io
from jbat.errors import JbatError
from jbat.lora import DoRALinear, LoRALinear, column_norms, merge_into_base
from jbat.models import hf_io

_PEFT_PREFIX = "base_model.model."
_LLAMA_NAMES = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
                "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
                "mlp.down_proj": "mlp.down_proj"}
_GPT2_NAMES = {"attn.o_proj": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_GPT2_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def _lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
  mods = {".".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)
          if isinstance(m, LoRALinear)}
  if not mods:
    raise JbatError("export_peft: the model has no LoRA adapters (apply jbat.lora.apply_lora)")
  return mods


def _ab(m: LoRALinear) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(m.lora_a[...], np.float32), np.asarray(m.lora_b[...], np.float32)


def _magnitude(m: LoRALinear) -> np.ndarray | None:
  return np.asarray(m.magnitude[...], np.float32) if isinstance(m, DoRALinear) else None


def peft_modules(model: nnx.Module, model_type: str) -> dict[str, tuple]:
  """{HF module name: (lora_A.weight [r, in], lora_B.weight [out, r], lora_alpha, DoRA
  magnitude [out] or None for plain LoRA)}.

  Raises JbatError for an adapter on a module with no HF counterpart.
  """
  if model_type not in hf_io.SUPPORTED_MODEL_TYPES:
    raise JbatError(f"export_peft: model_type {model_type!r} is not supported; supported model "
                    f"types: {', '.join(hf_io.SUPPORTED_MODEL_TYPES)}")
  out = {}
  fused: dict[int, dict[str, LoRALinear]] = collections.defaultdict(dict)
  for path, m in _lora_modules(model).items():
    if path == "lm_head":
      a, b = _ab(m)
      out["lm_head"] = (a.T, b.T, m.scale * a.shape[1], _magnitude(m))
      continue
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", path)
    sub = match and match.group(2)
    if match and model_type == "gpt2" and sub in _GPT2_QKV:
      fused[int(match.group(1))][sub] = m
      continue
    names = _GPT2_NAMES if model_type == "gpt2" else _LLAMA_NAMES
    if not match or sub not in names:
      raise JbatError(f"export_peft: LoRA on {path!r} has no {model_type} counterpart "
                      f"(supported: {', '.join(sorted(names))} in each layer, lm_head)")
    layer = f"transformer.h.{match.group(1)}" if model_type == "gpt2" else \
        f"model.layers.{match.group(1)}"
    a, b = _ab(m)
    out[f"{layer}.{names[sub]}"] = (a.T, b.T, m.scale * a.shape[1], _magnitude(m))
  for i, parts in sorted(fused.items()):
    out[f"transformer.h.{i}.attn.c_attn"] = _fuse_qkv(i, parts, model.layers[i].attn)
  return out


def _fuse_qkv(layer: int, parts: dict[str, LoRALinear], attn: nnx.Module) -> tuple:
  """GPT-2 c_attn LoRA from the q/k/v LoRAs present in `parts` (see the module docstring)."""
  present = [p for p in _GPT2_QKV if p in parts]
  ranks = {parts[p].lora_a.shape[1] for p in present}
  scales = {parts[p].scale for p in present}
  if len(ranks) > 1 or len(scales) > 1:
    raise JbatError(f"export_peft: layers.{layer} q/k/v adapters have different ranks {ranks} "
                    f"or scales {scales}; gpt2's fused c_attn needs them equal")
  r, scale = ranks.pop(), scales.pop()
  d = parts[present[0]].base.in_features
  a_c = np.concatenate([_ab(parts[p])[0] for p in present], axis=1)  # [D, r|S|]
  b_c = np.zeros((r * len(present), 3 * d), np.float32)
  for j, p in enumerate(present):
    col = _GPT2_QKV.index(p) * d
    b_c[j * r:(j + 1) * r, col:col + d] = _ab(parts[p])[1]
  mag = None
  if any(isinstance(parts[p], DoRALinear) for p in present):
    if not all(isinstance(parts[p], DoRALinear) for p in present):
      raise JbatError(f"export_peft: layers.{layer} mixes DoRA and LoRA on q/k/v; gpt2's fused "
                      f"c_attn needs one kind")
    # An untargeted projection keeps g = 1: its magnitude is its kernel's column norms.
    mag = np.concatenate([_magnitude(parts[p]) if p in parts else
                          np.asarray(column_norms(getattr(attn, p.split(".")[1]).kernel[...]))
                          for p in _GPT2_QKV])
  return a_c.T, b_c.T, scale * r * len(present), mag


def _layer_suffix(name: str) -> tuple[str, str]:
  """"model.layers.3.self_attn.q_proj" -> ("model.layers.3", "self_attn.q_proj")."""
  m = re.fullmatch(r"(.*\.(?:layers|h)\.\d+)\.(.+)", name)
  return (m.group(1), m.group(2)) if m else ("", name)


def target_modules(names: list[str], n_layers: int) -> list[str]:
  """peft target_modules matching exactly `names`: layer-relative suffixes ("self_attn.q_proj",
  which peft matches by name ending) when each adapted suffix is in all `n_layers` layers, else
  the full module names."""
  per_suffix = collections.Counter(_layer_suffix(n)[1] for n in names if _layer_suffix(n)[0])
  if all(c == n_layers for c in per_suffix.values()):
    return sorted({_layer_suffix(n)[1] for n in names})
  return sorted(names)


def adapter_config(modules: dict, base_model_name_or_path: str, model_type: str,
                   n_layers: int) -> dict:
  """The peft `LoraConfig` dict for `modules` (from `peft_modules`). The most common
  (r, lora_alpha) is global; any other goes to rank_pattern / alpha_pattern under its exact
  (regex-escaped) module name."""
  shapes = {k: (a.shape[0], alpha) for k, (a, _, alpha, _) in modules.items()}
  dora = {mag is not None for (_, _, _, mag) in modules.values()}
  if len(dora) > 1:
    raise JbatError("export_peft: the model mixes DoRA and plain LoRA modules; peft's "
                    "use_dora is one flag for the whole adapter")
  (r, alpha), _ = collections.Counter(shapes.values()).most_common(1)[0]
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": str(base_model_name_or_path),
      "r": int(r), "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none",
      "target_modules": target_modules(sorted(modules), n_layers),
      "rank_pattern": {re.escape(k): int(rk) for k, (rk, _) in shapes.items() if rk != r},
      "alpha_pattern": {re.escape(k): float(al) for k, (_, al) in shapes.items() if al != alpha},
      "fan_in_fan_out": model_type == "gpt2", "use_rslora": False, "use_dora": dora == {True},
      "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
      "layers_pattern": None, "inference_mode": True, "revision": None,
  }


def export_peft(model: nnx.Module, path: str | os.PathLike, base_model_name_or_path: str,
                model_type: str | None = None) -> pathlib.Path:
  """Writes `path`/adapter_config.json + adapter_model.safetensors for
  `peft.PeftModel.from_pretrained(base, path)`.

  `model` is a jbat CausalLM with LoRA applied (the scale alpha / r lives on the modules, so an
  adapter state alone is not enough); `model_type` defaults to `hf_io.infer_model_type`.
  Returns the folder.
  """
  model_type = model_type or hf_io.infer_model_type(model.cfg)
  modules = peft_modules(model, model_type)
  cfg = adapter_config(modules, base_model_name_or_path, model_type, model.cfg.n_layers)
  tensors = {}
  for name, (a, b, _, mag) in modules.items():
    tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a)
    tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b)
    if mag is not None:
      tensors[f"{_PEFT_PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(mag)
  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  with io.atomic_path(root / "adapter_model.safetensors") as tmp:
    safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
  io.write_json_atomic(root / "adapter_config.json", cfg)
  return root


def export_merged(model: nnx.Module, tokenizer, path: str | os.PathLike,
                  model_type: str | None = None) -> pathlib.Path:
  """Base + adapter merged (W + (alpha / r) A B per LoRA linear) and saved in Hugging Face
  layout with `hf_io.save_causal_lm`; the input model is unchanged. Returns the folder."""
  return hf_io.save_causal_lm(merge_into_base(model), tokenizer, path, model_type)
