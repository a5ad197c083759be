"""The one exception type users see.

Anything raised as `VqtokError` is a problem with the user's input (a bad file, an impossible option);
the CLI prints its message on one line and exits with code 1, without a traceback.
"""


class VqtokError(Exception):
    """A user-facing error. The message names the file (when there is one) and what is wrong with it."""


class TokenFileError(VqtokError, ValueError):
    """A `.vqt` token file or token shard that cannot be read: bad magic, version, checksum, truncation..."""
