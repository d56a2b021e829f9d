"""The reader seam: what every reader driver implements.

A driver adds no protocol knowledge. It moves APDU bytes to and from a card in the field or a
PSAM in a contact slot, and translates its library's exceptions into the agent's error tree:

* card gone or silent mid-command  -> :class:`agent.errors.CardRemovedError`
* reader unplugged / link broken   -> :class:`agent.errors.ReaderError`
* reader silent past the timeout   -> :class:`agent.errors.ReaderTimeout`
* SAM silent                       -> :class:`agent.errors.SamMuteError`
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class CardTechnology(enum.Enum):
    """What the reader found in the field, from ATQA/SAK/ATS."""

    ISO_DEP = "iso-dep"  # ISO 14443-4 (CPU card: PBOC / T-Union / CJ/T 166)
    MIFARE_CLASSIC = "mifare-classic"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class CardPresence:
    """A card the reader has activated. ``uid`` is the anticollision UID (4, 7 or 10 bytes).

    ``cards_in_field`` is how many cards (or phones) the reader saw at anticollision. A driver
    that cannot tell leaves it at 1 and says so in its docstring (PC/SC and nfcpy cannot; the
    serial module reports a collision with status 0x82). More than one is refused by
    :class:`agent.presence.PresenceGuard` before any command reaches a card.
    """

    uid: bytes
    technology: CardTechnology
    sak: int | None = None
    ats: bytes = b""  # ATS (ISO-DEP) or historical bytes of the PC/SC ATR
    cards_in_field: int = 1


@runtime_checkable
class CardReader(Protocol):
    """A contactless field with at most one activated card."""

    name: str

    def wait_for_card(self, timeout: float) -> CardPresence | None:
        """Block until a card is activated, or ``timeout`` seconds pass (then ``None``)."""
        ...

    def transmit(self, apdu: bytes) -> bytes:
        """Send one command APDU to the activated card; return the response APDU (data + SW)."""
        ...

    def wait_for_removal(self, timeout: float) -> bool:
        """Block until the card has left the field (``True``) or ``timeout`` passes (``False``).

        Truthful: ``True`` only once the field was seen empty (a card that stays, or another
        card that took its place without an empty field in between, is ``False``), never because
        the driver reconnected to its reader; a reader fault raises :class:`ReaderError`.
        """
        ...

    def feedback(self, ok: bool, text: str) -> None:
        """Beep / LED / display for the passenger. Called only after the outcome is durable."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SamSlot(Protocol):
    """A contact slot holding a PSAM."""

    name: str

    def reset(self) -> bytes:
        """Power the SAM on (or warm-reset it) and return its ATR."""
        ...

    def transmit(self, apdu: bytes) -> bytes:
        """Send one command APDU to the SAM; return the response APDU (data + SW)."""
        ...

    def close(self) -> None: ...
