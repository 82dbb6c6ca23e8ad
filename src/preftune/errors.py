"""The one exception type for user mistakes.

The CLI prints a `UserError` as a single line (`preftune: error: ...`) and exits with status 2, without a
traceback. Anything else is a bug in preftune and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a file, a row, a flag. The message names what is wrong and what was expected."""
