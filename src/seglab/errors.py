"""The one exception type for mistakes a user can fix.

Anything raised as :class:`SeglabError` reaches the command line as a single line
``seglab: error: <message>`` and exit status 2, without a traceback. Its message must
name the file or flag at fault and say what to do about it.
"""


class SeglabError(Exception):
    """A user error: bad path, bad flag, bad data. Printed as one line, exit status 2."""
