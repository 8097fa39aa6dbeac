"""The error every configuration problem raises, and the check the sections validate with."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, with the offending key and its source in the message."""


def _check(ok: bool, where: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key} {message}")
