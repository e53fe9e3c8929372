"""Errors of the table and figure builders; the CLI prints them and exits with code 2."""

from __future__ import annotations

from mmke.errors import MMKEError


class UnknownTableError(MMKEError):
    """A table or figure id that is not known; the message lists the available ones."""


class NoRunsError(MMKEError):
    """A results folder holds no complete run folder."""


class PublishedDataError(MMKEError):
    """A published-numbers CSV is missing or does not follow the tidy schema."""
