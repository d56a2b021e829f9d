"""An in-process validator rig: engine + real SQLite store + PSAM driver over simulators.

``restart()`` models an agent killed with SIGKILL: the old engine and store objects are
abandoned without closing anything, and new ones are opened from the same files. The PSAM and
the cards are hardware: they keep their state across the restart.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from agent.offline_store import DeviceKey, OfflineStore, Record
from agent.profile import Profile
from agent.sam.psam import PsamConfig, PsamDriver
from agent.transaction import TapOutcome, TransactionEngine
from tests.fake_reader.inprocess import CardField, InProcessReader, InProcessSamSlot
from tests.fake_reader.scenario import demo_keyset, demo_profile, make_psam

TERMINAL_ID = "RIG-0001"


class Rig:
    def __init__(self, directory: Path, **profile_overrides: Any) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.profile: Profile = dataclasses.replace(
            demo_profile(), double_tap_window_s=0.0, **profile_overrides
        )
        self.keyset = demo_keyset(self.profile)
        self.key_path = directory / "device.key"
        self.db_path = directory / "agent.db"
        self.device_key = DeviceKey.create(self.key_path)
        self.psam = make_psam(self.keyset)
        self.field = CardField()
        self.reader = InProcessReader(self.field)
        self.abandoned: list[OfflineStore] = []
        self._start()

    def _start(self) -> None:
        self.store = OfflineStore.open(self.db_path, DeviceKey.load(self.key_path), TERMINAL_ID)
        self.sam = PsamDriver(InProcessSamSlot(self.psam), PsamConfig.tunion())
        self.sam.open()
        self.engine = TransactionEngine(self.profile, self.store, self.sam)

    def restart(self) -> None:
        """kill -9: nothing is closed, nothing is flushed beyond what was committed."""
        self.abandoned.append(self.store)
        self._start()

    def tap(self, card: Any) -> TapOutcome:
        """Present a card, run one tap, take the card away (if it is still in the field)."""
        self.field.insert(card)
        presence = self.reader.wait_for_card(0)
        assert presence is not None
        try:
            return self.engine.process_tap(self.reader, presence)
        finally:
            self.field.remove()
            self.engine.presence.left()

    def expire(self) -> list[Record]:
        engine = TransactionEngine(
            dataclasses.replace(self.profile, recovery_window_s=-1.0), self.store, self.sam
        )
        return engine.expire_stale_intents()

    def records(self, card_id: str | None = None, kind: str | None = None) -> list[Record]:
        return [
            r
            for r in self.store.records()
            if (card_id is None or r.card_id == card_id) and (kind is None or r.kind == kind)
        ]

    def close(self) -> None:
        self.store.close()
        for store in self.abandoned:
            store.close()
