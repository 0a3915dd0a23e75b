"""A channel adapter that lives outside Switchboard's repository.

Used by the tests to prove that an installed package's adapter is discovered
through the ``switchboard.adapters`` entry point group, with no change to
Switchboard itself.
"""

from __future__ import annotations

from pydantic import BaseModel


class EchoSettings(BaseModel):
    greeting: str = "hello"


class EchoAdapter:
    name = "echo"
    summary = "Example adapter from a separate package"
    settings_class = EchoSettings

    @staticmethod
    def enabled_in(settings: object) -> bool:
        return True
