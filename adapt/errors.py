"""One exception type for mistakes the user can fix.

The CLI turns an `AdaptError` into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class AdaptError(Exception):
    """A user-facing error: the message says what is wrong and what to do instead."""
