"""Command line: `python -m jbat.train --config configs/demo.py [--config.train.steps=50 ...]`.

A thin layer: parse the ml_collections config (with `--config.x.y=v` overrides), validate it,
run `jbat.experiment.run` (or, for configs with `pipeline = "personalize"`, the diffusion
personalization experiment `jbat.diffusion.personalize.run`). Any problem with the user's input
exits with code 2 and a message naming the file or field; nothing is written before the config
(keys, values, the workdir and cache paths) is known to be valid. A training run that diverges
also exits 2 (`jbat.errors.Diverged`), after reporting the arms that finished.
`--help` (`--helpfull`) lists every config key with its default and description, and with
`--config` that config's values beside the defaults (see `jbat.cli_help`).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from jbat.errors import JbatError

def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  from jbat import cli_help
  wants_help = [a for a in argv[1:] if a in cli_help.HELP_FLAGS]
  argv = [argv[0]] + [a for a in argv[1:] if a not in cli_help.HELP_FLAGS]
  # Fresh flags per call: the `--config.x.y=v` override flags are defined from `argv`, so
  # main() can be called several times in one process (tests, notebooks).
  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Path to a config file (configs/<name>.py[:variant]).",
      flag_values=flag_values, lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
    config = config_flag.value
    if config is not None:
      config.to_dict()  # The config file is loaded lazily: surface its errors here.
  except Exception as e:  # noqa: BLE001  absl/ml_collections raise many types for bad flags.
    msg = str(e).replace("\\n", " ").replace("\n", " ")
    if isinstance(e, AttributeError):
      msg = f"unknown config key in an override: {msg}"
    print(f"jbat: error: bad command line: {msg}", file=sys.stderr)
    return 2
  if wants_help:  # The config's keys, defaults and descriptions (and its values, if given).
    print(cli_help.help_text(config, full="helpfull" in " ".join(wants_help)), end="")
    return 0
  if config is None:
    print("jbat: error: --config is required, e.g. --config configs/demo.py", file=sys.stderr)
    return 2
  from jbat import config as config_lib
  try:
    if config.get("pipeline", "lm") == "personalize":
      from jbat.diffusion import personalize
      personalize.validate(config)
      config_lib.check_dirs(config)
      personalize.run(config)
    else:
      config_lib.validate(config)
      config_lib.check_dirs(config)
      from jbat import distributed, experiment  # Heavy imports only after a good config.
      distributed.initialize(config.distributed)
      experiment.run(config)
  except JbatError as e:
    print(f"jbat: error: {e}", file=sys.stderr)
    return e.exit_code
  finally:
    config_lib.release_workdirs()  # main() may run again in this process (tests, notebooks).
  return 0


if __name__ == "__main__":
  sys.exit(main())
