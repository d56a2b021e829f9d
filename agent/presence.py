"""Card presence: a card that stays in the field is processed once, and one card at a time.

A validator must never charge a card twice because it lay on the reader, and must never debit
one card of a wallet held over the reader with two in it. :class:`PresenceGuard` is the rule,
pure and without I/O; the tap loop and the engine feed it what the reader observed:

* the engine calls :meth:`PresenceGuard.admit` with the reader's :class:`CardPresence` before
  it sends the card anything, :meth:`PresenceGuard.admit_card` once it has read the card's
  application serial (the card id), and :meth:`PresenceGuard.processed` after a tap that read
  the card, whatever its outcome;
* the loop (:func:`agent.validator.run_validator`) calls :meth:`PresenceGuard.left` when the
  reader has seen the field empty (``wait_for_removal`` returned ``True``), never on a reader
  fault or a reconnect: after those the card may still be there, and the guard refuses it.

A card is known both by its anticollision UID and by its card id, because phones (HCE) and many
CPU cards answer with a random UID at every activation: the UID check refuses a card before a
single APDU, the card id check catches the rest right after the read. The double-tap window of
the profile applies on top, in the engine: a card that did leave is still refused within it.

The guard remembers every card processed since the field was last seen empty (a few at most:
after a reader fault the loop cannot observe removal, so a card processed then and another one
processed after it are both still "possibly present"); :meth:`left` forgets them all.
"""

from __future__ import annotations

from collections import deque

from agent.errors import TapRefused
from agent.readers.base import CardPresence

STILL_PRESENT = "still_present"
ONE_CARD_AT_A_TIME = "one_card_at_a_time"


class PresenceGuard:
    """Which cards have been processed and not seen leaving since. Not thread-safe: one tap loop
    owns it. ``memory`` bounds how many such cards are remembered (the oldest go first)."""

    def __init__(self, memory: int = 8) -> None:
        if memory < 1:
            raise ValueError("memory must be at least 1")
        self._uids: deque[bytes] = deque(maxlen=memory)
        self._card_ids: deque[str] = deque(maxlen=memory)

    @property
    def awaiting_removal(self) -> bool:
        """Whether a processed card has not been seen leaving yet."""
        return bool(self._uids or self._card_ids)

    def admit(self, presence: CardPresence) -> None:
        """Before the first command to the card: refuse a crowded field or a card that stayed.

        Raises :class:`TapRefused` ``one_card_at_a_time`` when the reader saw more than one card,
        ``still_present`` when this UID was processed and the field has not been empty since.
        An empty UID (a reader that could not read it) is left to :meth:`admit_card`.
        """
        if presence.cards_in_field > 1:
            raise TapRefused(
                ONE_CARD_AT_A_TIME,
                f"{presence.cards_in_field} cards in the field; present one card only",
            )
        if presence.uid and presence.uid in self._uids:
            raise TapRefused(
                STILL_PRESENT,
                f"card UID {presence.uid.hex().upper()} has not left the field since its last tap",
            )

    def admit_card(self, card_id: str) -> None:
        """After reading the card id: refuse a card processed and not seen leaving since."""
        if card_id and card_id in self._card_ids:
            raise TapRefused(
                STILL_PRESENT, f"card {card_id} has not left the field since its last tap"
            )

    def processed(self, uid: bytes, card_id: str) -> None:
        """The engine read this card in a tap (paid, refused, torn, ...): it must leave first."""
        if uid and uid not in self._uids:
            self._uids.append(bytes(uid))
        if card_id and card_id not in self._card_ids:
            self._card_ids.append(card_id)

    def left(self) -> None:
        """The reader saw the field empty: every card may be tapped again."""
        self._uids.clear()
        self._card_ids.clear()
