"""`jbat.peft_io`: adapters exported for peft give jbat's logits in transformers + peft, and the
merged export gives them in plain transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[hf]')")
peft = pytest.importorskip("peft", reason="peft not installed (pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers")

from jbat import lora, peft_io  # noqa: E402
from jbat.errors import JbatError  # noqa: E402
from jbat.models import hf_io  # noqa: E402
from tests.test_hf_io import (  # noqa: E402
    TOL, gpt2_config, llama_config, qwen2_config, random_ids, save_hf, torch_logits)


def lora_model(path, targets: str, rank: int = 4, alpha: float = 8.0, seed: int = 0):
  """jbat model loaded from `path` with LoRA on `targets` and random non-zero lora_b."""
  model, tok = hf_io.load_causal_lm(path)
  lora.apply_lora(model, lora.LoRAConfig(rank=rank, alpha=alpha, targets=targets),
                  rngs=nnx.Rngs(seed))
  key = jax.random.key(seed + 1)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, lora.LoRALinear):
      key, sub = jax.random.split(key)
      m.lora_b[...] = 0.3 * jax.random.normal(sub, m.lora_b[...].shape)
  return model, tok


def peft_logits(base_dir, adapter_dir, ids):
  base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True)
  model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
  return torch_logits(model, ids)


@pytest.mark.parametrize("name,config,targets", [
    ("llama_all", llama_config, lora.DEFAULT_TARGETS),
    ("llama_some_layers", llama_config, r"layers\.1\.attn\.(q|v)_proj"),
    ("llama_lm_head", llama_config, r"lm_head|.*down_proj"),
    ("qwen2", qwen2_config, r".*(q_proj|k_proj|o_proj|up_proj)"),
    ("gpt2_all", gpt2_config, lora.DEFAULT_TARGETS),
    ("gpt2_q_v_only", gpt2_config, r".*(q_proj|v_proj|fc2)"),
])
def test_peft_logits_match(tmp_path, name, config, targets):
  save_hf(config(), tmp_path / "base")
  model, _ = lora_model(tmp_path / "base", targets)
  ids = random_ids(3)
  ours = np.asarray(model(jnp.asarray(ids)))
  base_only = np.asarray(lora.merge_into_base(model)(jnp.asarray(ids)))
  out = peft_io.export_peft(model, tmp_path / "adapter", str(tmp_path / "base"))
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert (cfg["peft_type"], cfg["task_type"]) == ("LORA", "CAUSAL_LM")
  theirs = peft_logits(tmp_path / "base", out, ids)
  np.testing.assert_array_less(np.abs(ours - theirs).max(), TOL)
  np.testing.assert_array_less(np.abs(base_only - theirs).max(), TOL)
  plain = torch_logits(
      transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval(), ids)
  assert np.abs(plain - theirs).max() > 100 * TOL  # The adapter really changes the logits.


def test_llama_keys_shapes_and_scale(tmp_path):
  save_hf(llama_config(), tmp_path / "base")
  model, _ = lora_model(tmp_path / "base", r".*(q_proj|v_proj)", rank=4, alpha=12.0)
  out = peft_io.export_peft(model, tmp_path / "adapter", "my/base")
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (4, 12.0, "my/base")
  assert cfg["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
  import safetensors.numpy
  t = safetensors.numpy.load_file(str(out / "adapter_model.safetensors"))
  assert len(t) == 2 * 2 * 2  # 2 layers x {q, v} x {A, B}
  a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
  b = t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
  assert a.shape == (4, 32) and b.shape == (16, 4)  # v: 2 kv heads x head_dim 8.
  np.testing.assert_array_equal(a, np.asarray(model.layers[0].attn.q_proj.lora_a[...]).T)


def test_gpt2_fused_qkv_rank_pattern(tmp_path):
  save_hf(gpt2_config(), tmp_path / "base")
  model, _ = lora_model(tmp_path / "base", r".*(q_proj|v_proj)")
  cfg = json.loads((peft_io.export_peft(model, tmp_path / "a", "b") / "adapter_config.json")
                   .read_text())
  assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (8, 16.0, ["attn.c_attn"])
  assert cfg["fan_in_fan_out"] is True


def test_export_merged_matches_in_transformers(tmp_path):
  save_hf(llama_config(), tmp_path / "base")
  model, tok = lora_model(tmp_path / "base", lora.DEFAULT_TARGETS)
  out = peft_io.export_merged(model, tok, tmp_path / "merged", "llama")
  ids = random_ids(4)
  theirs = torch_logits(
      transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval(),
      ids)
  np.testing.assert_array_less(np.abs(np.asarray(model(jnp.asarray(ids))) - theirs).max(), TOL)
  assert isinstance(model.layers[0].attn.q_proj, lora.LoRALinear)  # Input left unchanged.


def test_save_refuses_unmerged_lora(tmp_path):
  save_hf(llama_config(), tmp_path / "base")
  model, tok = lora_model(tmp_path / "base", lora.DEFAULT_TARGETS)
  with pytest.raises(JbatError, match="merge them first"):
    hf_io.save_causal_lm(model, tok, tmp_path / "out")


def test_export_without_lora(tmp_path):
  save_hf(llama_config(), tmp_path / "base")
  model, _ = hf_io.load_causal_lm(tmp_path / "base")
  with pytest.raises(JbatError, match="no LoRA adapters"):
    peft_io.export_peft(model, tmp_path / "a", "b")
