"""Errors the user can fix (bad data, mismatched models, unreachable server, unwritable output).

`learner.cli` turns a UserError into one line on stderr and exit code 2, with no traceback. Raise it
only for problems the user caused and can fix; bugs stay ordinary exceptions with tracebacks.
"""


class UserError(Exception):
    """A problem with the user's inputs or environment; the message says what to do about it."""
