"""The one exception type the CLI turns into a one-line message and exit code 2.

Anything raised as `UserError` is the user's input being wrong (unknown model,
missing file, malformed recipe, impossible config); everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the file, field or value and what was expected."""
