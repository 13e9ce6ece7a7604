"""Exceptions the command line turns into one-line errors."""


class UsageError(Exception):
    """Bad input from the command line: printed as one line on stderr, exit code 2."""


class TableError(ValueError):
    """A tuned-config table that cannot be used: names the file and the key."""


class RunFailure(Exception):
    """A run that could not finish (every worker failed): one line on stderr, exit code 1."""


def environment_errors() -> tuple[type[BaseException], ...]:
    """What the file system or a storage server can raise mid-run (disk full, a database
    restarting): the command reports these in one line and a rerun resumes, instead of a
    traceback."""
    errors: list[type[BaseException]] = [OSError, RunFailure]
    try:
        from optuna.exceptions import StorageInternalError

        errors.append(StorageInternalError)
    except ImportError:
        pass
    try:
        from sqlalchemy.exc import SQLAlchemyError

        errors.append(SQLAlchemyError)
    except ImportError:
        pass
    return tuple(errors)


def one_line(error: BaseException) -> str:
    """An error's message on one line: its first line (drivers add SQL and hints below)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first if first.startswith(type(error).__name__) or isinstance(error, (UsageError, ValueError)) \
        else f"{type(error).__name__}: {first}"
