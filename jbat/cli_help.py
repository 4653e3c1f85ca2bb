"""`--help` / `--helpfull` of the command line: every config key, its default, its description.

The descriptions are the comments next to each key in the schema's source (`base_config()` of
`jbat.config`, or of `jbat.diffusion.personalize` for personalization configs): a key's own
trailing comment, else the comment lines right above it. A section's description is the
comment above its `ConfigDict()`. So the schema's comments are the one place to document a key.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
from collections.abc import Callable
from typing import Any

import ml_collections

USAGE = ("usage: python -m jbat.train --config configs/<name>.py[:variant] "
         "[--config.KEY=VALUE ...] [--help | --helpfull]")
HELP_FLAGS = ("--help", "-help", "-h", "--helpfull", "-helpfull", "--helpshort")
SHORT = 100  # Characters of a description in --help (--helpfull: all).
_ASSIGN = re.compile(r"^\s*c\.([A-Za-z_][\w.]*)\s*=\s*(.*)$")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
  """A key's description: `inline` (its trailing comment) or `above` (the lines above it)."""

  inline: str
  above: str

  @property
  def full(self) -> str:
    return self.inline or self.above

  @property
  def short(self) -> str:
    """One line: the trailing comment, else the comment above cut to SHORT characters."""
    text = self.inline or self.above
    return text if len(text) <= SHORT else text[:SHORT - 3].rstrip() + "..."


def key_docs(schema_fn: Callable[[], Any]) -> dict[str, KeyDoc]:
  """{"section.key": KeyDoc} (sections too, as "section") from the source of `schema_fn`."""
  src = inspect.getsource(schema_fn)
  comments: dict[int, str] = {}
  code_lines: set[int] = set()
  skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
          tokenize.ENDMARKER)
  for tok in tokenize.generate_tokens(io.StringIO(src).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
    elif tok.type not in skip:
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  docs: dict[str, KeyDoc] = {}
  above: list[str] = []
  for lineno, line in enumerate(src.splitlines(), start=1):
    if lineno not in code_lines:  # A blank or comment-only line.
      above = above + [comments[lineno]] if lineno in comments else []
      continue
    m = _ASSIGN.match(line)
    if m:
      docs[m.group(1)] = KeyDoc(inline=comments.get(lineno, ""), above=" ".join(above))
    above = []
  return docs


def _fmt(value: Any) -> str:
  return repr(value)


def render(schema: ml_collections.ConfigDict, docs: dict[str, KeyDoc],
           config: ml_collections.ConfigDict | None = None, full: bool = False) -> str:
  """The help text: every key of `schema` with its default (and, given a config, the config's
  value beside the default where they differ) and its description (`full`: whole comments and
  the sections' descriptions)."""
  from jbat.config import flatten  # Deferred: jbat.config imports jax.
  defaults = flatten(schema)
  values = flatten(config) if config is not None else {}
  lines = [USAGE, ""]
  if config is None:
    lines.append("Config keys (override any with --config.KEY=VALUE), with their defaults:")
  else:
    lines.append("Config keys: this config's values (the default beside each value that "
                 "differs):")
  order = {k: i for i, k in enumerate(docs)}  # The schema's source order.
  section = None
  for key in sorted(defaults, key=lambda k: (order.get(k, len(order)), k)):
    default = defaults[key]
    sec = key.rsplit(".", 1)[0] if "." in key else ""
    if sec != section:
      section = sec
      lines.append("")
      if sec:
        doc = docs.get(sec)
        lines.append(f"[{sec}]" + (f"  {doc.above}" if full and doc and doc.above else ""))
    shown = f"{key} = {_fmt(values.get(key, default))}"
    if config is not None and key in values and values[key] != default:
      shown += f"  (default {_fmt(default)})"
    doc = docs.get(key)
    text = (doc.full if full else doc.short) if doc else ""
    pad = " " * max(1, 46 - len(shown))
    lines.append(f"  {shown}{pad}{text}".rstrip())
  return "\n".join(lines) + "\n"


def schema_for(config: ml_collections.ConfigDict | None
               ) -> tuple[ml_collections.ConfigDict, Callable[[], Any]]:
  """(schema, its base_config function) of a config's pipeline (None: the LM pipeline)."""
  if config is not None and config.get("pipeline", "lm") == "personalize":
    from jbat.diffusion import personalize
    return personalize.base_config(), personalize.base_config
  from jbat import config as config_lib
  return config_lib.base_config(), config_lib.base_config


def help_text(config: ml_collections.ConfigDict | None = None, full: bool = False) -> str:
  """The text `--help` (`--helpfull`: full=True) prints, for `config` if one was given."""
  schema, fn = schema_for(config)
  return render(schema, key_docs(fn), config, full)
