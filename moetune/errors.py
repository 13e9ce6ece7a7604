"""Exceptions the command line turns into one-line errors."""


class UsageError(Exception):
    """Bad input from the command line: printed as one line on stderr, exit code 2."""


class TableError(ValueError):
    """A tuned-config table that cannot be used: names the file and the key."""
