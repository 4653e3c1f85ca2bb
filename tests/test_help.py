"""`--help` / `--helpfull`: every config key, its default and description; a config's values."""

import pathlib

from jbat import cli_help, train
from jbat import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _schema_example():
  c = {}  # noqa: F841  (parsed, not run)
  # A section.
  c.sec = None
  c.sec.a = "x#y"  # The a key: '#' in a string is not a comment.
  # Above b, line one;
  # line two.
  c.sec.b = 2

  c.sec.c = 3
  return c


def test_key_docs_read_the_schema_comments():
  docs = cli_help.key_docs(_schema_example)
  assert docs["sec"].above == "A section."
  assert docs["sec.a"].inline == "The a key: '#' in a string is not a comment."
  assert docs["sec.b"].full == "Above b, line one; line two." and docs["sec.b"].inline == ""
  assert docs["sec.c"].full == ""  # A blank line separates it from b's comment.
  assert list(docs) == ["sec", "sec.a", "sec.b", "sec.c"]
  long = cli_help.KeyDoc(inline="", above="word " * 40)
  assert len(long.short) == cli_help.SHORT and long.short.endswith("...")


def test_help_lists_every_key_with_default_and_description(capsys):
  assert train.main(["jbat", "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: python -m jbat.train --config")
  for key, default in config_lib.flatten(config_lib.base_config()).items():
    assert f"  {key} = {default!r}" in out, key
  line = next(ln for ln in out.splitlines() if ln.startswith("  data.pool = "))
  assert "The backbone pool to select from" in line
  assert "(default" not in out


def test_help_with_a_config_shows_its_values(capsys):
  argv = ["jbat", "--config", str(ROOT / "configs/demo.py:tiny"), "--config.train.steps=7",
          "--helpfull"]
  assert train.main(argv) == 0
  out = capsys.readouterr().out
  assert "  train.steps = 7  (default 120)" in out
  assert "  data.max_len = 24  (default 64)" in out
  assert "[distributed]  Multi-process runs (jbat.distributed)." in out  # Sections: --helpfull.
  assert train.main(["jbat", "--config", str(ROOT / "configs/personalize_demo.py"), "-h"]) == 0
  out = capsys.readouterr().out
  assert "  aug.k = 100" in out and "backbone images per augmented arm" in out
  assert train.main(["jbat", "--config", str(ROOT / "configs/missing.py"), "--help"]) == 2
  assert "jbat: error: bad command line" in capsys.readouterr().err
