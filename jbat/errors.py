"""User-facing errors. Anything raised as `JbatError` is printed without a traceback and exits 2."""


class JbatError(Exception):
  """A problem with the user's input (config, files, data): the message says what and where."""

  exit_code = 2
