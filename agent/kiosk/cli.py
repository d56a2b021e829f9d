"""``cardagent kiosk``: the kiosk page and its JSON API on 127.0.0.1 for the reader of one
profile, loading cards online through the clearing host (``--host-url``) and taking cash from a
note acceptor (``--notes-url``: a serial device, or ``socket://HOST:PORT``)."""

from __future__ import annotations

import argparse
import dataclasses
import threading
from pathlib import Path
from typing import Any

import structlog

from agent.errors import ConfigurationError
from agent.kiosk.book import KioskBook
from agent.kiosk.host import KioskHost
from agent.kiosk.http import KioskHttpServer
from agent.kiosk.notes import NoteAcceptor, SerialNoteAcceptor
from agent.kiosk.service import KioskService
from agent.offline_store import DeviceKey, OfflineStore
from agent.pos.cli import parse_listen
from agent.pos.orders import OrderBook
from agent.pos.service import PosService
from agent.profile import Profile, load_profile
from agent.runner import _open_hardware_until_ready, _stop_on_signals
from agent.sdnotify import Notifier, Watchdog
from agent.tap.load import KioskLoader
from agent.transaction import TransactionEngine
from agent.wiring import DEVICE_KEY_FILE, DataDir, Hardware

log = structlog.get_logger("agent.kiosk")

DEFAULT_LISTEN = "127.0.0.1:8810"
BOOK_FILE = "kiosk.db"


def register(sub: Any, default_data_dir: Path) -> None:
    p = sub.add_parser("kiosk", help="serve the kiosk page (top-up, bills) on 127.0.0.1")
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=default_data_dir)
    p.add_argument("--reader-url", help="override the profile's reader URL")
    p.add_argument("--host-url", required=True, help="the clearing host (load authorisation)")
    p.add_argument("--notes-url", help="the note acceptor (serial device or socket://…)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT on the loopback")
    p.add_argument("--card-wait", type=float, default=30.0, help="seconds to wait for a card")
    p.add_argument("--note-timeout", type=float, default=10.0, help="seconds a note may take")
    p.set_defaults(func=cmd_kiosk)


@dataclasses.dataclass
class Kiosk:
    """A kiosk service and what it holds open."""

    service: KioskService
    store: OfflineStore
    host: KioskHost
    book: KioskBook
    notes: NoteAcceptor | None

    def close(self) -> None:
        self.service.close()
        self.service.pos.close()
        if self.notes is not None:
            self.notes.close()
        self.host.close()
        self.book.close()


def build_kiosk(
    profile: Profile,
    data_dir: DataDir,
    store: OfflineStore,
    hardware: Hardware,
    host_url: str,
    notes_url: str | None,
    *,
    card_wait_s: float = 30.0,
    note_timeout_s: float = 10.0,
    put_back_wait_s: float = 120.0,
) -> Kiosk:
    """The kiosk over opened hardware and store (``cardagent kiosk``, the demo, the tests)."""
    if profile.pos_max_amount <= 0:
        raise ConfigurationError(
            f"{profile.source}: the kiosk pays bills as POS purchases: [pos] max_amount is needed"
        )
    kiosk_id = store.terminal_id
    device = DeviceKey.load(data_dir.path / DEVICE_KEY_FILE)
    host = KioskHost(host_url, kiosk_id, device)
    book = KioskBook(data_dir.path / BOOK_FILE)
    notes: NoteAcceptor | None = None
    try:
        notes = SerialNoteAcceptor(notes_url) if notes_url else None
        # the kiosk's terminal number (6 bytes, in MAC1/MAC2 and the card's log): its PSAM's
        route = profile.applications[0].family.value
        terminal = hardware.sams.sam_for(route).terminal_number
        loader = KioskLoader(profile, store, host, terminal)
        engine = TransactionEngine(profile, store, hardware.sams)
        pos = PosService(engine, hardware.reader, OrderBook(store.path))
        service = KioskService(
            profile,
            hardware.reader,
            loader,
            pos,
            host,
            book,
            notes,
            data_dir.path / "receipts",
            kiosk_id=kiosk_id,
            card_wait_s=card_wait_s,
            note_timeout_s=note_timeout_s,
            put_back_wait_s=put_back_wait_s,
        )
    except BaseException:
        if notes is not None:
            notes.close()
        host.close()
        book.close()
        raise
    return Kiosk(service, store, host, book, notes)


def cmd_kiosk(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    address = parse_listen(args.listen)
    data_dir = DataDir(args.data_dir)
    stop = threading.Event()
    _stop_on_signals(stop)
    store = data_dir.open_store()
    try:
        hardware = _open_hardware_until_ready(
            profile, data_dir, args.reader_url, stop, Watchdog(Notifier())
        )
        if hardware is None:
            return 0
        try:
            kiosk = build_kiosk(
                profile,
                data_dir,
                store,
                hardware,
                args.host_url,
                args.notes_url,
                card_wait_s=args.card_wait,
                note_timeout_s=args.note_timeout,
            )
            server = KioskHttpServer(address, kiosk.service)
            try:
                thread = threading.Thread(target=server.serve_forever, name="kiosk-http")
                thread.start()
                url = f"http://{address[0]}:{server.server_address[1]}/"
                log.info("kiosk_listening", url=url, terminal=store.terminal_id)
                stop.wait()
                server.shutdown()
                thread.join(10)
            finally:
                server.server_close()
                kiosk.close()
        finally:
            hardware.close()
    finally:
        store.close()
    return 0
