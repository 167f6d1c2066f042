"""Exception types shared by the whole package.

The CLI maps them to exit codes: :class:`ConfigError` and :class:`UsageError` exit with 2,
every other :class:`CytonetError` with 1. Each carries a message that names the offending
file, key or value, so that one line is enough for the user to act on it.
"""

from pathlib import Path


class CytonetError(Exception):
    """A runtime failure the user can act on (bad input file, existing output, ...)."""


class ConfigError(CytonetError):
    """A configuration key is unknown, has the wrong type, or an invalid value."""


class UsageError(CytonetError):
    """The command line itself is malformed (bad override syntax, missing argument)."""


class InputError(CytonetError):
    """An input file is missing, truncated, or holds data of an unsupported kind."""


class OutputExistsError(CytonetError):
    """An output already exists and ``--overwrite`` was not given."""


def not_found(path: Path, what: str, folder: bool = False) -> str:
    """Why ``path`` (a ``what``: "encoder file", "section folder") cannot be used: it does not exist, or it is a
    folder where a file is wanted (``folder`` False) or something else where a folder is."""
    if not (path.exists() or path.is_symlink()):
        return f"{what} {path} does not exist"
    if folder:
        return f"{what} {path} is not a folder"
    return f"{what} {path} is {'a folder' if path.is_dir() else 'not a regular file'}"


def some_of(names: list[str]) -> str:
    """``names`` in a message: the first, and how many more (``"a.txt and 3 more"``)."""
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")
