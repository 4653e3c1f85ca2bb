"""A third task for the ALBAT default: the tweets of another account, `goodhealth`.

  python -m jbat.train --config configs/demo_goodhealth.py   # ~15 min cold on a 2-core CPU

Everything is configs/demo.py except the target account. The account was fixed before any
result was seen, by a rule: the largest account other than bbchealth (7,478 tweets; lifestyle
and wellness headlines, unlike bbchealth's news). The recipe is not tuned for it. It checks
that the default does not only work on the task it was chosen on; configs/demo_fortunes.py
is the other check (a fortunes category).
"""

import pathlib

from jbat.config import load_config_file


def get_config(arg: str | None = None):
  c = load_config_file(pathlib.Path(__file__).with_name("demo.py"), arg)
  c.name = "demo_goodhealth" + (f"_{arg}" if arg else "")
  c.data.domain = "goodhealth"
  return c
