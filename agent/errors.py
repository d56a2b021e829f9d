"""The agent's error tree. Every error says *who* failed.

::

    AgentError
    ├── ReaderError                 the reader hardware / its driver / the link to it
    │   └── ReaderTimeout           the reader did not answer within the profile's timeout
    ├── CardError                   the card (PICC) in the field
    │   ├── CardRemovedError        the card left the field or stopped answering (tearing)
    │   ├── CardStatusError         the card refused a command with a status word
    │   └── CardProtocolError       the card answered something malformed or implausible
    ├── SamError                    the PSAM / secure access module
    │   ├── SamMuteError            the SAM did not answer
    │   ├── SamStatusError          the SAM refused a command with a status word
    │   ├── SamProtocolError        the SAM answered something malformed
    │   └── SamUnavailable          the SAM a card family is routed to is missing or mute
    ├── StoreError                  the offline store (SQLite, device key)
    ├── ConfigurationError          a firmware profile or parameter set is unusable
    └── TapRefused                  a business decision, not a fault: expired, low balance, ...

Drivers translate their library's exceptions into this tree at the seam (``raise ... from exc``).
A tap that raises any :class:`AgentError` is refused with the error's message in the log; any
other exception escaping the tap path is a bug.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    party = "agent"


class ReaderError(AgentError):
    """The reader (or the link to it) failed."""

    party = "reader"


class ReaderTimeout(ReaderError):
    """The reader did not answer in time."""


class CardError(AgentError):
    """The card failed."""

    party = "card"


class CardRemovedError(CardError):
    """The card left the field, or stopped answering: the command's fate is unknown."""


class CardStatusError(CardError):
    """The card answered a command with a status word other than the expected one."""

    def __init__(self, command: str, sw: int, meaning: str) -> None:
        super().__init__(f"card refused {command}: SW {sw:04X} ({meaning})")
        self.command = command
        self.sw = sw
        self.meaning = meaning


class CardProtocolError(CardError):
    """The card's answer breaks the protocol (length, encoding, impossible values)."""


class SamError(AgentError):
    """The secure access module failed."""

    party = "sam"


class SamMuteError(SamError):
    """The SAM did not answer."""


class SamStatusError(SamError):
    """The SAM answered a command with an unexpected status word."""

    def __init__(self, command: str, sw: int, meaning: str) -> None:
        super().__init__(f"SAM refused {command}: SW {sw:04X} ({meaning})")
        self.command = command
        self.sw = sw
        self.meaning = meaning


class SamProtocolError(SamError):
    """The SAM's answer breaks the protocol."""


class SamUnavailable(SamError):
    """The SAM slot a route (card family or ``m1``) needs is missing, mute or lacks the PSAM
    application: that route is refused while the other routes keep working."""

    def __init__(self, slot: str, route: str, detail: str) -> None:
        super().__init__(f"SAM slot {slot!r} for route {route!r} unavailable: {detail}")
        self.slot = slot
        self.route = route
        self.detail = detail


class StoreError(AgentError):
    """The offline store failed (disk, database, device key)."""

    party = "store"


class ConfigurationError(AgentError):
    """A firmware profile, parameter set or command-line option is unusable."""

    party = "configuration"


class TapRefused(AgentError):
    """The terminal decided not to take this card; ``reason`` is a stable code for logs."""

    party = "policy"

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
