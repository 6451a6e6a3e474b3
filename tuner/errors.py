"""Errors that mean "the user asked for something that cannot work".

Library modules raise these; only ``tuner.cli`` catches them, prints their
message on one line per problem and exits with code 2. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class TunerError(Exception):
    """A user mistake: bad configuration, missing file, unusable data."""


class SpaceError(TunerError):
    """A search-space file is invalid. Carries every problem found, each with its key path."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(
            "\n".join(f"{source}: {path}: {msg}" if path else f"{source}: {msg}" for path, msg in problems)
        )


class DataError(TunerError):
    """A data source cannot be read or cannot be split as asked."""


class StorageError(TunerError):
    """The study storage cannot be reached, or the study there does not fit this space."""
