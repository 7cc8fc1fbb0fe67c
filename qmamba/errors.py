"""The one exception type for user mistakes: the CLI prints its message as one line, exit 2."""


class QMambaError(Exception):
    """A problem with what the user gave us (path, file, config, option), not a bug."""
