"""Fault schedules for the simulated card and PSAM (architecture.md "Simulators").

A fault fires at the n-th APDU a simulator receives (1-based, counted since the simulator was
created or since its last ``reset_command_count()``):

* ``tear_before``      the card leaves the field before touching any state: nothing happened.
* ``tear_after``       the command is processed and committed, then the answer is lost.
* ``corrupt_response`` the command is processed; one byte of the answer is flipped (the last data
                       byte, e.g. MAC2 of a DEBIT; SW2 when there is no data).
* ``mute``             the device goes silent before processing and stays silent until it is
                       powered again (card: re-enters the field; PSAM: reset).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["tear_before", "tear_after", "corrupt_response", "mute"]


class CardTorn(Exception):
    """The simulated card or PSAM left the field / went mute: the reader gets no answer."""


@dataclass(frozen=True)
class Fault:
    at_command: int
    kind: FaultKind


@dataclass
class FaultSchedule:
    """Pending faults; each is removed when it fires."""

    faults: list[Fault] = field(default_factory=list)

    @classmethod
    def of(cls, *faults: Fault) -> FaultSchedule:
        return cls(list(faults))

    def add(self, at_command: int, kind: FaultKind) -> None:
        self.faults.append(Fault(at_command, kind))

    def extend(self, faults: Iterable[Fault]) -> None:
        self.faults.extend(faults)

    def pop(self, command_number: int) -> Fault | None:
        """The fault scheduled for ``command_number`` (removed), or ``None``."""
        for i, fault in enumerate(self.faults):
            if fault.at_command == command_number:
                return self.faults.pop(i)
        return None

    def __len__(self) -> int:
        return len(self.faults)

    def clear(self) -> None:
        self.faults.clear()


def corrupt(response: bytes) -> bytes:
    """Flip the last data byte of a response APDU, or SW2 when it carries no data."""
    raw = bytearray(response)
    if len(raw) > 2:
        raw[-3] ^= 0xFF
    elif raw:
        raw[-1] ^= 0xFF
    return bytes(raw)
