"""In-process reader and SAM slot over the simulators: the ``CardReader`` / ``SamSlot`` seams
without any hardware (architecture.md "Simulators")."""

from __future__ import annotations

import time
from typing import Any

from agent.errors import CardRemovedError, ReaderError, SamMuteError
from agent.readers.base import CardPresence, CardTechnology
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.psam import SimulatedPsam

ISO_DEP_SAK = 0x20


class CardField:
    """The RF field of one reader: at most one card."""

    def __init__(self) -> None:
        self._card: Any = None

    @property
    def card(self) -> Any:
        """A SimulatedCpuCard, an M1Card, or a wrapper of one (anything with ``process``)."""
        return self._card

    def insert(self, card: Any) -> None:
        """The card enters the field (power-on: its RAM state is reset)."""
        card.power_on()
        self._card = card

    def remove(self) -> Any:
        card, self._card = self._card, None
        return card


class InProcessReader:
    """:class:`agent.readers.base.CardReader` over a :class:`CardField`."""

    def __init__(
        self, field: CardField, name: str = "in-process", poll_interval: float = 0.005
    ) -> None:
        self.field = field
        self.name = name
        self.poll_interval = poll_interval
        self.feedback_log: list[tuple[bool, str]] = []
        self.transmitted: list[bytes] = []
        self._closed = False

    def wait_for_card(self, timeout: float) -> CardPresence | None:
        self._check_open()
        deadline = time.monotonic() + timeout
        while True:
            card = self.field.card
            if card is not None:
                return CardPresence(card.uid, CardTechnology.ISO_DEP, ISO_DEP_SAK, card.ats)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.poll_interval, remaining))

    def transmit(self, apdu: bytes) -> bytes:
        self._check_open()
        card = self.field.card
        if card is None:
            raise CardRemovedError("no card in the field")
        self.transmitted.append(bytes(apdu))
        try:
            response: bytes = card.process(apdu)
        except CardTorn as exc:
            self.field.remove()
            raise CardRemovedError(f"card left the field: {exc}") from exc
        return response

    def wait_for_removal(self, timeout: float) -> bool:
        self._check_open()
        deadline = time.monotonic() + timeout
        while self.field.card is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(self.poll_interval, remaining))
        return True

    def feedback(self, ok: bool, text: str) -> None:
        self.feedback_log.append((ok, text))

    @property
    def feedbacks(self) -> list[tuple[bool, str]]:
        return list(self.feedback_log)

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ReaderError(f"reader {self.name} is closed")


class InProcessSamSlot:
    """:class:`agent.readers.base.SamSlot` holding a :class:`SimulatedPsam`."""

    def __init__(self, psam: SimulatedPsam, name: str = "in-process-sam") -> None:
        self.psam = psam
        self.name = name
        self._closed = False

    def reset(self) -> bytes:
        self._check_open()
        return self.psam.reset()

    def transmit(self, apdu: bytes) -> bytes:
        self._check_open()
        try:
            return self.psam.process(apdu)
        except CardTorn as exc:
            raise SamMuteError(f"SAM in {self.name} did not answer: {exc}") from exc

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ReaderError(f"SAM slot {self.name} is closed")
