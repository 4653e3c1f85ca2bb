"""Example formats: records -> token ids plus a loss weight per target.

Formats (`data.format` for the task sources, `data.pool_format` for the pool):

  text             one text field; every target has weight 1.
  prompt_response  a prompt field and a response field; weight 0 on targets inside the prompt,
                   1 on response targets (and on the closing eos / special tokens after it).
  chat             a list of {"role", "content"} messages rendered with the tokenizer's own chat
                   template (transformers `apply_chat_template`); weight 1 on the tokens of the
                   assistant turns (their content and the template's end-of-turn tokens), 0 on
                   system / user turns and on the template's own headers.

Every encoded example is {"id": int, "ids": int32[n], "weights": float32[n - 1]} with
2 <= n <= max_len + 1: ids[j + 1] is the target of input ids[j], with loss weight weights[j]
(see `jbat.data.pipeline`). A text example has no "weights" (1.0 on every target), so with the
jbat framing it is exactly `pipeline.encode`'s example (same batches, same cache hashes).

Framing (special tokens), for text and prompt_response:
  "jbat"       [bos] text [eos] (prompt and response ids concatenated inside it): the framing
               of jbat's own byte-level BPE tokenizer, whose numbers the demos report.
  "tokenizer"  the tokenizer's own convention: what its post-processor adds with
               add_special_tokens=True (e.g. Llama: a bos; GPT-2 and Qwen: nothing). A
               prompt_response example also gets the tokenizer's eos after the response when
               the tokenizer has one and its suffix holds none (trained, weight 1): the model
               must learn to stop, and generation stops at eos. A text example gets no eos
               (plain text has no end the model should predict).
`default_framing` picks "jbat" for jbat's own tokenizer (`jbat.data.tokenizer`) and
"tokenizer" for any other. A chat conversation always gets exactly the template's tokens.

Prompt and response are tokenized separately and concatenated, so the boundary between them is
exact (write the separator you want into the prompt, e.g. a trailing newline). An example whose
response targets are all cut away by max_len is not kept: it is counted in
`EncodeStats.cut` (and its id listed), as is an example with no target at all (`EncodeStats.empty`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jbat.errors import JbatError

FORMATS = ("text", "prompt_response", "chat")
FRAMINGS = ("jbat", "tokenizer")
_CHUNK = 1024
_PROBE = "hello world"
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Fields:
  """The record fields each format reads."""

  text: str = "text"
  prompt: str = "prompt"
  response: str = "response"
  messages: str = "messages"


@dataclasses.dataclass
class EncodeStats:
  """What `encode_records` left out. cut: examples whose response was cut away entirely by
  max_len; empty: examples with no (input, target) pair at all. The *_ids lists hold their ids."""

  kept: int = 0
  cut: int = 0
  empty: int = 0
  cut_ids: list[int] = dataclasses.field(default_factory=list)
  empty_ids: list[int] = dataclasses.field(default_factory=list)


def required_fields(fmt: str, fields: Fields = Fields()) -> tuple[str, ...]:
  """The fields a record of format `fmt` must have (the Parquet columns to read)."""
  check_format(fmt)
  return {"text": (fields.text,), "prompt_response": (fields.prompt, fields.response),
          "chat": (fields.messages,)}[fmt]


def check_format(fmt: str, what: str = "data.format") -> None:
  if fmt not in FORMATS:
    raise JbatError(f"{what} must be one of {', '.join(FORMATS)}; got {fmt!r}")


def is_jbat_tokenizer(tokenizer: Any) -> bool:
  """True for jbat's own byte-level BPE tokenizer (marked by `jbat.data.tokenizer`)."""
  return bool(getattr(tokenizer, "jbat_bpe", False))


def default_framing(tokenizer: Any) -> str:
  """"jbat" for jbat's own tokenizer, "tokenizer" for any other."""
  return "jbat" if is_jbat_tokenizer(tokenizer) else "tokenizer"


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
  """(prefix, suffix): the ids the tokenizer's post-processor puts around a text when called
  with add_special_tokens=True (e.g. ([bos], []) for Llama, ([], []) for GPT-2)."""
  raw = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
  full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
  for i in range(len(full) - len(raw) + 1):
    if full[i:i + len(raw)] == raw:
      return full[:i], full[i + len(raw):]
  raise JbatError("cannot tell which special tokens the tokenizer adds (its add_special_tokens "
                  "output does not contain the plain encoding); use framing='jbat'.")


def response_stop(tokenizer: Any, affixes: tuple[list[int], list[int]] | None) -> list[int]:
  """The ids appended to a prompt_response response under the "tokenizer" framing (`affixes`
  not None): [eos] when the tokenizer has an eos and its own suffix does not already hold it,
  else []. The "jbat" framing (affixes None) ends every example with eos already."""
  eos = getattr(tokenizer, "eos_token_id", None)
  if affixes is None or eos is None or eos in affixes[1]:
    return []
  return [int(eos)]


def _string_field(record: Any, name: str, fmt: str) -> str:
  fields = record.fields
  if name not in fields or fields[name] is None:
    raise JbatError(f"{record.where}: {fmt} record has no field {name!r}.")
  value = fields[name]
  if not isinstance(value, str):
    raise JbatError(f"{record.where}: field {name!r} must be a string, got "
                    f"{type(value).__name__}.")
  return value


def _frame(bos_eos: tuple[int, int] | None, affixes: tuple[list[int], list[int]] | None,
           parts: Sequence[Sequence[int]], trained_from: int) -> tuple[list[int], list[float]]:
  """ids = prefix + parts... + suffix; weights[j] (target ids[j + 1]) = 1 iff the target lies
  at or after part `trained_from` (so the suffix is trained, the prefix never)."""
  prefix, suffix = ([bos_eos[0]], [bos_eos[1]]) if bos_eos is not None else affixes
  ids = list(prefix)
  start = len(prefix) + sum(len(p) for p in parts[:trained_from])
  for p in parts:
    ids.extend(p)
  ids.extend(suffix)
  weights = [1.0 if j + 1 >= start else 0.0 for j in range(len(ids) - 1)]
  return ids, weights


def _chat_messages(record: Any, field: str) -> list[dict[str, str]]:
  messages = record.fields.get(field)
  if messages is None:
    raise JbatError(f"{record.where}: chat record has no field {field!r}.")
  if not isinstance(messages, list) or not messages:
    raise JbatError(f"{record.where}: field {field!r} must be a non-empty list of messages.")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
        or not isinstance(m.get("content"), str):
      raise JbatError(f"{record.where}: {field}[{i}] must be an object with string 'role' and "
                      f"'content', got {m!r}.")
    out.append({"role": m["role"], "content": m["content"]})
  if not any(m["role"] == "assistant" for m in out):
    raise JbatError(f"{record.where}: chat record has no assistant turn (roles: "
                    f"{', '.join(m['role'] for m in out)}).")
  return out


def _render(tokenizer: Any, messages: list[dict[str, str]], where: str, **kw: Any) -> str:
  try:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
  except Exception as e:  # noqa: BLE001  jinja raises its own types for template errors.
    raise JbatError(f"{where}: the chat template failed on this conversation: {e}") from None


def encode_chat(record: Any, tokenizer: Any, field: str = "messages"
                ) -> tuple[list[int], list[float]]:
  """(ids, target weights) of one chat record, untruncated.

  A template that marks the assistant's tokens itself (`{% generation %}` blocks) gives the
  mask through transformers' `return_assistant_tokens_mask`. Otherwise the conversation is
  rendered once and each assistant turn i spans the characters from the end of messages[:i]
  rendered with the generation prompt to the end of messages[:i + 1] rendered (trailing
  whitespace excluded); a token is an assistant token when its first character lies in such a
  span. weights[j] is 1 when target ids[j + 1] is an assistant token.
  """
  messages = _chat_messages(record, field)
  if _GENERATION.search(tokenizer.chat_template or ""):
    try:
      enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
    except Exception as e:  # noqa: BLE001  jinja raises its own types for template errors.
      raise JbatError(f"{record.where}: the chat template failed on this conversation: "
                      f"{e}") from None
    return list(enc["input_ids"]), [float(m) for m in enc["assistant_masks"][1:]]
  if not getattr(tokenizer, "is_fast", False):
    raise JbatError("data format 'chat' needs a fast (Rust) tokenizer to locate the assistant "
                    "tokens (or a chat template with {% generation %} blocks).")
  full = _render(tokenizer, messages, record.where)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before = _render(tokenizer, messages[:i], record.where, add_generation_prompt=True) \
        if i else ""
    through = _render(tokenizer, messages[:i + 1], record.where)
    if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
      raise JbatError(f"{record.where}: the tokenizer's chat template does not render a "
                      "conversation as the concatenation of its turns, so the assistant tokens "
                      "cannot be located.")
    spans.append((len(before), len(through.rstrip())))
  enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
  ids = list(enc["input_ids"])
  mine = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
  return ids, [1.0 if m else 0.0 for m in mine[1:]]


def encode_records(records: Sequence[Any], tokenizer: Any, max_len: int, fmt: str = "text",
                   fields: Fields = Fields(), framing: str | None = None
                   ) -> tuple[list[Example], EncodeStats]:
  """Encodes records (`jbat.data.files.Record`s: .id, .fields, .where) of format `fmt`.

  Args:
    max_len: L; examples are truncated to L + 1 ids (L targets).
    framing: "jbat" or "tokenizer" (see the module docstring); None: `default_framing`.

  Returns:
    (examples in input order, minus those cut or empty; EncodeStats).

  Raises:
    JbatError naming the record's file and line: a missing / non-string field, a chat record
      without an assistant turn; or a tokenizer without a chat template for fmt="chat".
  """
  check_format(fmt)
  if max_len < 1:
    raise JbatError(f"max_len must be >= 1, got {max_len}.")
  framing = default_framing(tokenizer) if framing is None else framing
  if framing not in FRAMINGS:
    raise JbatError(f"framing must be one of {', '.join(FRAMINGS)}; got {framing!r}")
  if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
    raise JbatError("data format 'chat' needs a tokenizer with a chat template, and this one "
                    f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) "
                    "has none; use format 'prompt_response' or a chat model's tokenizer.")
  bos_eos = affixes = None
  if fmt != "chat":
    if framing == "jbat":
      bos_eos = (tokenizer.bos_token_id, tokenizer.eos_token_id)
      if None in bos_eos:
        raise JbatError("framing 'jbat' needs a tokenizer with bos and eos tokens.")
    else:
      affixes = special_affixes(tokenizer)
  stats = EncodeStats()
  out: list[Example] = []
  for start in range(0, len(records), _CHUNK):
    chunk = records[start:start + _CHUNK]
    if fmt == "text":
      texts = [_string_field(r, fields.text, fmt) for r in chunk]
      toks = tokenizer(texts, add_special_tokens=False)["input_ids"]
      encoded = [_frame(bos_eos, affixes, [t], 0) for t in toks]
    elif fmt == "prompt_response":
      prompts = [_string_field(r, fields.prompt, fmt) for r in chunk]
      responses = [_string_field(r, fields.response, fmt) for r in chunk]
      p_toks = tokenizer(prompts, add_special_tokens=False)["input_ids"]
      r_toks = tokenizer(responses, add_special_tokens=False)["input_ids"]
      stop = response_stop(tokenizer, affixes)
      encoded = [_frame(bos_eos, affixes, [p, list(r) + stop], 1)
                 for p, r in zip(p_toks, r_toks)]
    else:
      encoded = [encode_chat(r, tokenizer, fields.messages) for r in chunk]
    for rec, (ids, weights) in zip(chunk, encoded):
      ids = np.asarray(ids[:max_len + 1], np.int32)
      w = np.asarray(weights[:max(len(ids) - 1, 0)], np.float32)
      if len(ids) < 2:
        stats.empty += 1
        stats.empty_ids.append(int(rec.id))
      elif fmt != "text" and not w.any():
        stats.cut += 1
        stats.cut_ids.append(int(rec.id))
      elif fmt == "text":
        out.append({"id": int(rec.id), "ids": ids})
      else:
        out.append({"id": int(rec.id), "ids": ids, "weights": w})
  stats.kept = len(out)
  return out, stats


def record_text(record: Any, fmt: str, fields: Fields = Fields()) -> str:
  """The record's text as one string (for exact-text overlap checks and the manifest): the
  text, or the prompt and the response / the messages' contents, joined by newlines."""
  if fmt == "text":
    return _string_field(record, fields.text, fmt)
  if fmt == "prompt_response":
    return (_string_field(record, fields.prompt, fmt) + "\n"
            + _string_field(record, fields.response, fmt))
  return "\n".join(m["content"] for m in _chat_messages(record, fields.messages))
