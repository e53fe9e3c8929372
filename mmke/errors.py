"""Errors a user can act on: each names what is wrong, where, and what to do."""

from __future__ import annotations


class MMKEError(Exception):
    """Base class of every error mmke raises on purpose; the CLI prints it without a traceback."""


class DataError(MMKEError):
    """A data file, record or field is missing or malformed."""

    def __init__(self, message: str, *, file: str | None = None, index: int | None = None,
                 field: str | None = None, hint: str | None = None) -> None:
        where = []
        if file is not None:
            where.append(f"file {file}")
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (", ".join(where) + ": " if where else "") + message
        if hint:
            text += f"\n  -> {hint}"
        super().__init__(text)
        self.file, self.index, self.field, self.hint = file, index, field, hint


class WeightsNotFoundError(MMKEError):
    """Backbone weights are not at the configured path and cannot be downloaded."""


class ConfigError(MMKEError):
    """A configuration value is invalid or a combination is not supported."""


def check_choice(setting: str, value: object, allowed: tuple | list) -> None:
    """Raise a ConfigError naming ``setting`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{setting}={value!r} is not one of {tuple(allowed)}")
