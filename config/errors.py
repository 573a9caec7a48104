"""ConfigError: every problem found in the configuration, reported together."""

from __future__ import annotations

from typing import Iterable


class ConfigError(Exception):
    """The configuration is unusable; `errors` holds one precise message per problem."""

    def __init__(self, errors: Iterable[str]):
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)
