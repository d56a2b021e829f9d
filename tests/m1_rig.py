"""A test rig for M1 taps: store file, fake clock, software SAM, handler, field and reader.

``kill9()`` abandons the handler and the store object without closing anything and opens a
new store on the same file with the same device key, as an agent restarted after ``kill -9``.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.offline_store import DeviceKey, OfflineStore, Record
from agent.products.m1_codec import decode_backup, decode_public_info, value_or_none
from agent.products.m1_layout import M1Layout
from agent.products.m1_purse import Classification, PurseState, classify
from agent.profile import Profile
from agent.readers.base import CardPresence
from agent.sam.base import Sam
from agent.tap.m1 import M1Handler
from agent.transaction import TapOutcome, TransactionEngine, unresolved_body
from tests.fake_reader.m1_card import M1Card
from tests.fake_reader.m1_readers import (
    InProcessM1Reader,
    M1Field,
    M1FrameCard,
    PcscM1Reader,
    RawFrameReader,
)
from tests.fake_reader.scenario import demo_profile, m1_layout, m1_software_sam

TERMINAL = "T-M1"
START = dt.datetime(2024, 5, 1, 8, 30, tzinfo=dt.UTC)


def fast_tmp_dir() -> Path:
    """/dev/shm when available (SQLite fsync costs nothing there), else the temp dir."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="m1-", dir=base))


class Clock:
    def __init__(self, start: dt.datetime = START) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class M1Rig:
    def __init__(
        self,
        layout: M1Layout | None = None,
        *,
        profile: Profile | None = None,
        reader: str = "inprocess",
        directory: Path | None = None,
        engine_setup: Callable[[TransactionEngine], None] | None = None,
    ) -> None:
        self.profile = profile or demo_profile()
        self.layout = layout or m1_layout(self.profile)
        self.dir = directory or fast_tmp_dir()
        self.path = self.dir / "agent.db"
        self.key = DeviceKey.generate()
        self.clock = Clock()
        self.sam = m1_software_sam()
        self.field = M1Field()
        self.reader_kind = reader
        self.reader: InProcessM1Reader | PcscM1Reader | RawFrameReader
        if reader == "pcsc":
            self.reader = PcscM1Reader(self.field)
        elif reader == "raw":
            self.reader = RawFrameReader(self.field)
        else:
            self.reader = InProcessM1Reader(self.field)
        self._frame_cards: dict[int, M1FrameCard] = {}
        self.engine_setup = engine_setup  # applied to every engine (after kill9 too)
        self.store = self._open_store()
        self.handler = self._handler()
        self.abandoned: list[Any] = []

    def _open_store(self) -> OfflineStore:
        return OfflineStore.open(self.path, self.key, TERMINAL, clock=self.clock)

    def _handler(self) -> TransactionEngine:
        engine = m1_engine(self.profile, self.store, self.sam, self.layout, clock=self.clock)
        if self.engine_setup is not None:
            self.engine_setup(engine)
        return engine

    def kill9(self) -> None:
        """Abandon the agent's objects (no close, no cleanup) and start a new agent."""
        self.abandoned.append((self.handler, self.store))
        self.store = self._open_store()
        self.sam = m1_software_sam()  # the PSAM's RAM is gone too
        self.handler = self._handler()

    def tap(self, card: M1Card, *, advance: float = 10.0) -> TapOutcome:
        self.clock.advance(advance)
        if self.reader_kind == "raw":  # the same RF front end (PRNG) each time the card returns
            self.field.insert(self._frame_cards.setdefault(id(card), M1FrameCard(card)))
        else:
            self.field.insert(card)
        presence = self.reader.wait_for_card(0.0)
        assert isinstance(presence, CardPresence)
        outcome = self.handler.process_tap(self.reader, presence)
        self.field.remove()
        self.handler.presence.left()
        return outcome

    def records(self, kind: str | None = None, card: M1Card | None = None) -> list[Record]:
        out = list(self.store.records())
        if kind is not None:
            out = [r for r in out if r.kind == kind]
        if card is not None:
            out = [r for r in out if r.card_id == card.uid.hex().upper()]
        return out

    def pending(self, card: M1Card | None = None) -> int:
        return len(self.store.pending_intents(None if card is None else card.uid.hex().upper()))

    def expire_all(self) -> list[Record]:
        self.clock.advance(self.profile.recovery_window_s + 1)
        cutoff = self.clock() - dt.timedelta(seconds=self.profile.recovery_window_s)
        return self.store.expire_intents(cutoff, lambda i: unresolved_body(i, "test expiry"))


def card_state(card: M1Card, layout: M1Layout) -> PurseState:
    """The purse state read straight from the card's memory (no reader, no keys)."""
    p_blk, b_blk = layout.purse_blocks
    pp_blk, pb_blk = layout.public_blocks
    p, b = value_or_none(card.get_block(p_blk)), value_or_none(card.get_block(b_blk))

    def pub(raw: bytes, backup: bool) -> Any:
        try:
            block = decode_backup(raw, layout.public_backup_encoding) if backup else raw
            return decode_public_info(block, layout.check, layout.check_seed)
        except Exception:
            return None

    return PurseState(
        None if p is None else p.value,
        None if b is None else b.value,
        pub(card.get_block(pp_blk), False),
        pub(card.get_block(pb_blk), True),
    )


def card_classification(card: M1Card, layout: M1Layout) -> Classification:
    return classify(card_state(card, layout), layout)


def m1_engine(
    profile: Profile, store: OfflineStore, sam: Sam, layout: M1Layout, **kwargs: Any
) -> TransactionEngine:
    """An engine that takes M1 cards only, with ``layout`` (a test may vary it)."""
    return TransactionEngine(
        profile, store, sam, handlers=[M1Handler(profile, layout=layout)], **kwargs
    )
