"""The engine against a card that answers garbage: every tap ends in an outcome, never a crash."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.readers.base import CardPresence, CardTechnology
from tests.fake_reader.scenario import make_card
from tests.rig import Rig

FAST_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


class GarbleReader:
    """A reader whose card answers the real card's responses, some replaced by random bytes."""

    name = "garble"

    def __init__(self, card, replacements: dict[int, bytes]) -> None:
        self.card = card
        self.replacements = replacements
        self.count = 0
        self.feedbacks: list[tuple[bool, str]] = []

    def wait_for_card(self, timeout: float) -> CardPresence | None:
        return CardPresence(self.card.uid, CardTechnology.ISO_DEP, 0x20, self.card.ats)

    def transmit(self, apdu: bytes) -> bytes:
        self.count += 1
        real: bytes = self.card.process(apdu)
        return self.replacements.get(self.count, real)

    def wait_for_removal(self, timeout: float) -> bool:
        return True

    def feedback(self, ok: bool, text: str) -> None:
        self.feedbacks.append((ok, text))

    def close(self) -> None:
        pass


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    family=st.sampled_from(["tunion", "cjt166", "legacy1001"]),
    replacements=st.dictionaries(
        st.integers(min_value=1, max_value=9), st.binary(max_size=40), max_size=3
    ),
)
def test_garbage_answers_end_in_an_outcome(family: str, replacements: dict[int, bytes]) -> None:
    """Random answers at random commands: an outcome with a reason; no wrong record."""
    tmp = Path(tempfile.mkdtemp(dir=FAST_DIR))
    rig = Rig(tmp)
    try:
        card = make_card(family, 1, rig.keyset, balance=5000)  # type: ignore[arg-type]
        reader = GarbleReader(card, replacements)
        outcome = rig.engine.process_tap(reader, reader.wait_for_card(0))  # type: ignore[arg-type]
        assert outcome.status in ("paid", "recovered", "refused", "torn", "failed")
        if outcome.status != "paid":
            assert outcome.reason
        assert reader.feedbacks, "the passenger always gets feedback"
        # A record never claims a debit the card did not make, and a debit whose answer was
        # garbled is still covered by a pending intent.
        purchases = rig.records(kind="purchase")
        pending = rig.store.pending_intents()
        assert len(purchases) <= len(card.debits) <= len(purchases) + len(pending)
        for record, debit in zip(purchases, card.debits, strict=False):
            assert record.fields["counter"] == debit.counter
            assert record.amount == debit.amount
        assert rig.store.verify().ok
    finally:
        rig.close()
        shutil.rmtree(tmp, ignore_errors=True)
