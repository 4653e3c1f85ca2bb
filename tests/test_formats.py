"""jbat.data.formats: token ids and per-target loss weights; the weights through the batches,
the model's loss (vs a brute-force response-only NLL) and a score kernel."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers
from flax import nnx
from tokenizers import models, pre_tokenizers, processors

from jbat import losses
from jbat import lora as lora_lib
from jbat.data import files, formats, pipeline
from jbat.data.sources import Document
from jbat.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from jbat.errors import JbatError
from jbat.models.causal_lm import CausalLM, LMConfig
from jbat.scoring import kernels

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant"] + [f"w{i}" for i in range(9, 40)]
VOCAB = len(SPECIAL) + len(WORDS)  # 40
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer(chat=True, bos=False, eos="<eos>", eos_suffix=False):
  """A tiny WordLevel HF tokenizer; chat: with a ChatML-like template; bos: its post-processor
  puts <bos> first (as Llama's does); eos: its eos token (None: none); eos_suffix: its
  post-processor puts <eos> last."""
  vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  if bos or eos_suffix:
    tok.post_processor = processors.TemplateProcessing(
        single=("<bos> " if bos else "") + "$A" + (" <eos>" if eos_suffix else ""),
        special_tokens=[("<bos>", 1), ("<eos>", 2)])
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token=eos,
      unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  if chat:
    hf.chat_template = CHAT_TEMPLATE
  return hf


def rec(i, **fields):
  return files.Record(uid=str(i), id=i, file="t.jsonl", row=i, line=i + 1, fields=fields)


def words(tok, ids):
  return tok.convert_ids_to_tokens([int(i) for i in ids])


def trained(ex):
  """The target tokens of weight 1."""
  return [int(t) for t, w in zip(ex["ids"][1:], ex["weights"]) if w]


def test_text_framing_jbat_matches_encode_and_tokenizer_framing_follows_post_processor(tmp_path):
  docs = [Document(i, t, "x") for i, t in enumerate(["hello world", "a b c d e f g", "zz"])]
  bpe = train_bpe_tokenizer([d.text for d in docs] * 5, 300, tmp_path / "tok.json")
  assert formats.default_framing(bpe) == "jbat"
  assert formats.default_framing(load_tokenizer(tmp_path / "tok.json")) == "jbat"
  recs = [rec(d.id, text=d.text) for d in docs]
  got, stats = formats.encode_records(recs, bpe, 6)
  want = pipeline.encode(docs, bpe, 6)
  assert stats.kept == 3 and stats.cut == stats.empty == 0
  for g, w in zip(got, want):  # Exactly encode's examples: no weights (1.0 each).
    assert g.keys() == w.keys() == {"id", "ids"}
    assert g["id"] == w["id"] and np.array_equal(g["ids"], w["ids"])
  # All-one weights give bitwise the same batches as none.
  ones = [dict(ex, weights=np.ones(len(ex["ids"]) - 1, np.float32)) for ex in got]
  for fn in (pipeline.pad_batch, pipeline.pack_batch):
    a, b = fn(got, 4, 6, 0), fn(ones, 4, 6, 0)
    assert all(np.array_equal(a[k], b[k]) for k in a)

  plain = make_tokenizer(chat=False)  # GPT-2 / Qwen-like: adds nothing.
  assert formats.default_framing(plain) == "tokenizer"
  (ex,), _ = formats.encode_records([rec(0, text="w9 w10 w11")], plain, 8)
  assert words(plain, ex["ids"]) == ["w9", "w10", "w11"] and "weights" not in ex
  llama = make_tokenizer(chat=False, bos=True)  # Llama-like: a bos, no eos.
  assert formats.special_affixes(llama) == ([1], [])
  (ex,), _ = formats.encode_records([rec(0, text="w9 w10 w11")], llama, 8)
  assert words(llama, ex["ids"]) == ["<bos>", "w9", "w10", "w11"]
  (ex,), _ = formats.encode_records([rec(0, text="w9 w10 w11")], llama, 8, framing="jbat")
  assert words(llama, ex["ids"]) == ["<bos>", "w9", "w10", "w11", "<eos>"]
  _, stats = formats.encode_records([rec(3, text="w9")], plain, 8)  # One token, no target.
  assert (stats.kept, stats.empty, stats.empty_ids) == (0, 1, [3])


def test_prompt_response_weights_and_cut_responses():
  tok = make_tokenizer(chat=False, bos=True)
  recs = [rec(0, prompt="w9 w10 w11", response="w12 w13"),
          rec(1, question="w9 w10 w11 w12 w13 w14", answer="w15")]
  (ex,), stats = formats.encode_records(recs[:1], tok, 16, "prompt_response")
  # The tokenizer's framing (a bos) plus its eos after the response, trained: the model learns
  # to stop.
  assert words(tok, ex["ids"]) == ["<bos>", "w9", "w10", "w11", "w12", "w13", "<eos>"]
  assert ex["weights"].tolist() == [0, 0, 0, 1, 1, 1]  # Targets w9 w10 w11 | w12 w13 <eos>.
  (ex,), _ = formats.encode_records(recs[:1], make_tokenizer(chat=False, eos=None), 16,
                                    "prompt_response")  # No eos token: nothing appended.
  assert words(tok, ex["ids"]) == ["w9", "w10", "w11", "w12", "w13"]
  assert ex["weights"].tolist() == [0, 0, 1, 1]
  eos_last = make_tokenizer(chat=False, eos_suffix=True)  # Its post-processor ends with eos.
  assert formats.special_affixes(eos_last) == ([], [2])
  (ex,), _ = formats.encode_records(recs[:1], eos_last, 16, "prompt_response")
  assert words(tok, ex["ids"]) == ["w9", "w10", "w11", "w12", "w13", "<eos>"]  # Not twice.
  (ex,), _ = formats.encode_records([rec(0, text="w9 w10")], tok, 16)
  assert words(tok, ex["ids"]) == ["<bos>", "w9", "w10"]  # Plain text: no eos.
  (ex,), _ = formats.encode_records(recs[:1], tok, 16, "prompt_response", framing="jbat")
  assert words(tok, ex["ids"])[-1] == "<eos>" and ex["weights"].tolist() == [0, 0, 0, 1, 1, 1]
  fields = formats.Fields(prompt="question", response="answer")
  assert formats.required_fields("prompt_response", fields) == ("question", "answer")
  got, stats = formats.encode_records(recs[1:], tok, 6, "prompt_response", fields)
  assert got == [] and (stats.cut, stats.cut_ids) == (1, [1])  # The answer is past max_len.
  got, stats = formats.encode_records(recs[1:], tok, 7, "prompt_response", fields)
  assert stats.kept == 1 and trained(got[0]) == tok.convert_tokens_to_ids(["w15"])
  with pytest.raises(JbatError, match=r"t.jsonl, line 2: prompt_response record has no field "
                                      r"'prompt'"):
    formats.encode_records(recs, tok, 16, "prompt_response")
  with pytest.raises(JbatError, match=r"line 1: field 'response' must be a string"):
    formats.encode_records([rec(0, prompt="w9", response=3)], tok, 16, "prompt_response")


CHAT = [{"role": "system", "content": "w10"}, {"role": "user", "content": "w11 w12"},
        {"role": "assistant", "content": "w13 w14"}, {"role": "user", "content": "w15"},
        {"role": "assistant", "content": "w16"}]


def test_chat_weights_follow_the_template(tmp_path):
  tok = make_tokenizer()
  tok.save_pretrained(str(tmp_path / "tok"))
  tok = load_tokenizer(tmp_path / "tok")  # An HF tokenizer folder: its own template.
  (ex,), _ = formats.encode_records([rec(0, messages=CHAT)], tok, 64, "chat")
  toks = words(tok, ex["ids"])
  assert toks == ["<|im_start|>", "system", "w10", "<|im_end|>", "<|im_start|>", "user", "w11",
                  "w12", "<|im_end|>", "<|im_start|>", "assistant", "w13", "w14", "<|im_end|>",
                  "<|im_start|>", "user", "w15", "<|im_end|>", "<|im_start|>", "assistant",
                  "w16", "<|im_end|>"]  # The template's tokens only: no bos, no eos.
  assert [t for t, w in zip(toks[1:], ex["weights"]) if w] == [
      "w13", "w14", "<|im_end|>", "w16", "<|im_end|>"]
  assert [j for j, w in enumerate(ex["weights"]) if w] == [10, 11, 12, 19, 20]
  # A template marking the assistant's tokens itself. It has no generation prompt, so the
  # rendering-by-prefixes method would also weight each turn's "<|im_start|> assistant" header.
  marked = make_tokenizer()
  marked.chat_template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
      "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}"
      "{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}")
  (same,), _ = formats.encode_records([rec(0, messages=CHAT)], marked, 64, "chat")
  assert np.array_equal(same["ids"], ex["ids"]) and np.array_equal(same["weights"], ex["weights"])
  (short,), stats = formats.encode_records([rec(0, messages=CHAT)], tok, 12, "chat")
  assert len(short["ids"]) == 13 and short["weights"].sum() == 2 and stats.cut == 0
  _, stats = formats.encode_records([rec(0, messages=CHAT)], tok, 10, "chat")
  assert stats.cut == 1
  assert formats.record_text(rec(0, messages=CHAT), "chat") == "w10\nw11 w12\nw13 w14\nw15\nw16"


def test_chat_errors():
  tok = make_tokenizer()
  no_answer = [{"role": "user", "content": "w9"}]
  with pytest.raises(JbatError, match=r"t.jsonl, line 1: chat record has no assistant turn"):
    formats.encode_records([rec(0, messages=no_answer)], tok, 16, "chat")
  with pytest.raises(JbatError, match=r"line 1: chat record has no field 'messages'"):
    formats.encode_records([rec(0, text="w9")], tok, 16, "chat")
  with pytest.raises(JbatError, match=r"messages\[0\] must be an object"):
    formats.encode_records([rec(0, messages=["hi"])], tok, 16, "chat")
  with pytest.raises(JbatError, match=r"needs a tokenizer with a chat template"):
    formats.encode_records([rec(0, messages=CHAT)], make_tokenizer(chat=False), 16, "chat")
  with pytest.raises(JbatError, match=r"data.format must be one of"):
    formats.check_format("csv")


def test_weights_through_pad_pack_and_eval_batches():
  exs = [{"id": 7, "ids": np.arange(1, 6, dtype=np.int32),
          "weights": np.asarray([0, 0, 1, 1], np.float32)},
         {"id": 8, "ids": np.arange(1, 4, dtype=np.int32)},  # No weights: 1.0 on every target.
         {"id": 9, "ids": np.arange(1, 8, dtype=np.int32),
          "weights": np.asarray([0, 1, 0, 1, 0, 1], np.float32)}]
  b = pipeline.pad_batch(exs, 4, 5, 0)
  np.testing.assert_array_equal(b["weights"], [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0],
                                               [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
  p = pipeline.pack_batch(exs, 2, 7, 0)
  np.testing.assert_array_equal(p["weights"], [[0, 0, 1, 1, 1, 1, 0], [0, 1, 0, 1, 0, 1, 0]])
  ev = list(pipeline.eval_batches(exs, 2, 5, 0, shard_index=1, shard_count=2))
  assert len(ev) == 1 and ev[0]["weights"][0].tolist() == [1, 1, 0, 0, 0]
  def digest(examples):
    h = hashlib.sha256()
    pipeline.hash_examples(h, examples)
    return h.hexdigest()

  # Caches keyed by the examples tell weightings apart; unweighted examples hash as before.
  flipped = [dict(exs[0], weights=1 - exs[0]["weights"])] + exs[1:]
  assert len({digest(exs), digest(flipped), digest(exs[1:2])}) == 3
  h = hashlib.sha256()
  h.update(np.int64(8).tobytes() + np.arange(1, 4, dtype=np.int32).tobytes() + b"\x00")
  assert digest(exs[1:2]) == h.hexdigest()
  bad = [{"id": 1, "ids": np.arange(4, dtype=np.int32), "weights": np.ones(2, np.float32)}]
  with pytest.raises(JbatError, match=r"example 1: 2 weights for 3 targets"):
    pipeline.pad_batch(bad, 1, 8, 0)


def _model():
  cfg = LMConfig.llama_like(VOCAB, max_len=32, d_model=16, n_layers=1, n_heads=2, d_ff=32)
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  lora_lib.apply_lora(model, lora_lib.LoRAConfig(rank=2, alpha=2.0), rngs=nnx.Rngs(1))
  return model


def _examples():
  """prompt_response and chat examples of the tiny tokenizer (weights with zeros)."""
  tok = make_tokenizer(bos=True)
  pr = [rec(0, prompt="w9 w10 w11", response="w12 w13 w14"),
        rec(1, prompt="w20", response="w21 w22 w23 w24"),
        rec(2, prompt="w30 w31 w32 w33 w34", response="w35")]
  chat = [rec(3, messages=CHAT), rec(4, messages=CHAT[1:3])]
  a, _ = formats.encode_records(pr, tok, 24, "prompt_response")
  b, _ = formats.encode_records(chat, tok, 24, "chat")
  return a + b


@nnx.jit
def _forward(model, ids):
  return model(ids)


def _brute_nll(model, ex):
  """Response-only mean NLL of one example, token by token: the model run on this example alone
  (right-padded to a fixed length: causal, so position j sees ids[:j+1] only), -log p(ids[j+1])
  in float64 summed over the targets of weight 1 / their count."""
  ids = np.zeros((1, 24), np.int32)
  ids[0, :len(ex["ids"]) - 1] = ex["ids"][:-1]
  logits = np.asarray(_forward(model, jnp.asarray(ids)), np.float64)[0]
  total, count = 0.0, 0
  for j, w in enumerate(ex["weights"]):
    if not w:
      continue
    lse = np.log(np.exp(logits[j] - logits[j].max()).sum()) + logits[j].max()
    total += lse - logits[j, ex["ids"][j + 1]]
    count += 1
  return total / count


def test_loss_and_scores_see_only_response_tokens():
  model = _model()
  exs = _examples()
  assert all(0 < ex["weights"].sum() < len(ex["weights"]) for ex in exs)
  graphdef, phi0, rest = lora_lib.split(model)
  phi_s = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), phi0)
  model_s = lora_lib.merge(graphdef, phi_s, rest)
  want0 = [_brute_nll(model, ex) for ex in exs]
  want_s = [_brute_nll(model_s, ex) for ex in exs]

  def loss_fn(adapter, batch):
    return losses.lm_per_example_loss(lora_lib.merge(graphdef, adapter, rest), batch)

  padded = {k: jnp.asarray(v) for k, v in pipeline.pad_batch(exs, 6, 24, 0).items()}
  np.testing.assert_allclose(np.asarray(loss_fn(phi0, padded))[:5], want0, rtol=2e-5)
  packed = {k: jnp.asarray(v) for k, v in pipeline.pack_batch(exs[:3], 1, 24, 0).items()}
  assert int(packed["segment_ids"].max()) == 3  # Three documents in one row: one loss.
  w_sum = [ex["weights"].sum() for ex in exs[:3]]
  np.testing.assert_allclose(float(loss_fn(phi0, packed)[0]),
                             np.dot(want0[:3], w_sum) / sum(w_sum), rtol=2e-5)
  scores = kernels.jit_kernel(kernels.loss_diff, loss_fn)(phi0, phi_s, padded)
  np.testing.assert_allclose(np.asarray(scores)[:5], np.subtract(want0, want_s), rtol=1e-4,
                             atol=1e-6)
  assert np.all(np.asarray(scores)[5:] == 0.0)  # The padding row.
