"""Random taps, tears and agent restarts on CPU cards (issue #2).

Invariant, checked after every step: no card is ever debited more than it has records or
pending intents for; and once every card has been presented once more without faults, the sum of
all card balance changes equals the sum of the recorded amounts, with one purchase record per
debit and nothing left pending.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.fake_reader.scenario import make_card
from tests.rig import Rig

BALANCE = 100_000
EXAMPLES = int(os.environ.get("STATEFUL_EXAMPLES", "1000"))
# A thousand examples take minutes on a busy 2-core machine: this bounds a hang, not speed.
pytestmark = pytest.mark.timeout(1800)
FAST_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


class CpuTapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(dir=FAST_DIR))
        self.rig = Rig(self.tmp)
        families = ("tunion", "cjt166", "legacy1001")
        self.cards = [
            make_card(families[i % 3], i, self.rig.keyset, balance=BALANCE)  # type: ignore[arg-type]
            for i in range(4)
        ]
        self.settled = False

    @rule(
        index=st.integers(min_value=0, max_value=3),
        fault=st.none()
        | st.tuples(
            st.integers(min_value=1, max_value=10),
            st.sampled_from(["tear_before", "tear_after", "corrupt_response"]),
        ),
    )
    def tap(self, index: int, fault: tuple[int, Any] | None) -> None:
        card = self.cards[index]
        card.reset_command_count()
        card.faults.faults.clear()
        if fault is not None:
            card.faults.add(*fault)
        self.settled = False
        outcome = self.rig.tap(card)
        assert outcome.status in ("paid", "recovered", "torn", "failed", "refused"), outcome
        if outcome.status == "failed" and "bug" in outcome.reason:
            raise AssertionError(outcome)

    @rule()
    def restart(self) -> None:
        self.rig.restart()

    @invariant()
    def never_more_debits_than_evidence(self) -> None:
        pending = self.rig.store.pending_intents()
        for card in self.cards:
            asn = card.asn.hex().upper()
            recorded = sum(1 for r in self.rig.records(kind="purchase") if r.fields["asn"] == asn)
            waiting = sum(1 for i in pending if i.payload["asn"] == asn)
            assert len(card.debits) <= recorded + waiting, (card, recorded, waiting)
            assert recorded <= len(card.debits), (card, recorded)

    @rule()
    def settle(self) -> None:
        """Present every card once, cleanly: all pending intents must resolve."""
        for card in self.cards:
            card.faults.faults.clear()
            assert self.rig.tap(card).status in ("paid", "recovered")
        assert not self.rig.store.pending_intents()
        assert not self.rig.records(kind="unresolved")
        spent = sum(BALANCE - card.balance for card in self.cards)
        recorded = sum(r.amount for r in self.rig.records(kind="purchase"))
        assert spent == recorded, (spent, recorded)
        for card in self.cards:
            asn = card.asn.hex().upper()
            counters = sorted(
                int(r.fields["counter"])  # type: ignore[arg-type]
                for r in self.rig.records(kind="purchase")
                if r.fields["asn"] == asn
            )
            assert counters == sorted(d.counter for d in card.debits), card
        assert self.rig.store.verify().ok
        self.settled = True

    def teardown(self) -> None:
        if not self.settled:
            self.settle()
        self.rig.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


CpuTapMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=12, deadline=None
)
TestCpuTaps = CpuTapMachine.TestCase
