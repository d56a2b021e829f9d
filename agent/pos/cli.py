"""``cardagent pos``: serve the POS API for the reader of one profile on the loopback interface."""

from __future__ import annotations

import argparse
import ipaddress
import threading
from pathlib import Path
from typing import Any

import structlog

from agent.agent_status import AGENT_STATUS_FILE, ReaderHealth, StatusPublisher
from agent.console.settings import SettingsFile
from agent.errors import ConfigurationError
from agent.params import PARAMS_FILE, ActiveParams
from agent.pos.http import PosHttpServer, PosUnixServer
from agent.pos.orders import OrderBook
from agent.pos.service import PosService
from agent.profile import load_profile
from agent.runner import (
    _open_blacklist,
    _open_hardware_until_ready,
    _stop_on_signals,
    reader_location,
)
from agent.sdnotify import Notifier, Watchdog
from agent.transaction import TransactionEngine
from agent.wiring import DataDir

log = structlog.get_logger("agent.pos")

DEFAULT_LISTEN = "127.0.0.1:8800"
STATUS_TICK_S = 1.0  # how often the POS looks whether its status file is due


def register(sub: Any, default_data_dir: Path) -> None:
    """Add the ``pos`` subcommand to ``cardagent``'s subparsers."""
    p = sub.add_parser("pos", help="serve the local POS API (purchase by order id) on 127.0.0.1")
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=default_data_dir)
    p.add_argument("--reader-url", help="override the profile's reader URL")
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help="HOST:PORT on the loopback interface, or unix:PATH (a Unix socket, mode 0660)",
    )
    p.set_defaults(func=cmd_pos)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    try:
        port = int(port_text)
        loopback = sep == ":" and ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError as exc:
        raise ConfigurationError(f"--listen {text!r}: expected HOST:PORT") from exc
    if not loopback:
        raise ConfigurationError(
            f"--listen {text!r}: the POS API listens on the loopback interface only (no "
            "authentication: whoever reaches it can debit the card on the reader)"
        )
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"--listen {text!r}: port out of range")
    return host.strip("[]"), port


def cmd_pos(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    unix = Path(args.listen.removeprefix("unix:")) if args.listen.startswith("unix:") else None
    host, port = ("", 0) if unix is not None else parse_listen(args.listen)
    if profile.pos_max_amount <= 0:
        raise ConfigurationError(f"{profile.source}: the POS needs [pos] max_amount (fen)")
    data_dir = DataDir(args.data_dir)
    stop = threading.Event()
    _stop_on_signals(stop)
    store = data_dir.open_store(cut_over=True)  # a new device key waiting: in force now
    health = ReaderHealth("card", profile.reader.driver, reader_location(profile, args.reader_url))
    publisher = StatusPublisher(
        data_dir.path / AGENT_STATUS_FILE,
        mode="pos",
        profile=profile.name,
        terminal_id=store.terminal_id,
        reader=health,
    )
    try:
        publisher.tick()
        hardware = _open_hardware_until_ready(
            profile, data_dir, args.reader_url, stop, Watchdog(Notifier()), publisher.waiting
        )
        if hardware is None:
            return 0
        try:
            engine = TransactionEngine(
                profile,
                store,
                hardware.sams,
                blacklist=_open_blacklist(data_dir),
                params=ActiveParams(data_dir.path / PARAMS_FILE),
            )
            engine.site = SettingsFile(data_dir.path).site  # the console's terminal settings
            service = PosService(engine, hardware.reader, OrderBook(store.path))
            service.health, service.on_tap = health, publisher.tapped
            publisher.sams = hardware.sams.describe
            service.probe_reader()  # the reader's state before the first request
            server: PosHttpServer | PosUnixServer
            if unix is not None:
                server = PosUnixServer(unix, service)
                where = f"unix:{unix}"
            else:
                server = PosHttpServer((host, port), service)
                where = f"http://{host}:{server.server_address[1]}"
            try:
                thread = threading.Thread(target=server.serve_forever, name="pos-http")
                thread.start()
                log.info("pos_listening", url=where, terminal=store.terminal_id)
                publisher.running()
                while not stop.wait(STATUS_TICK_S):
                    publisher.tick()  # changes at once, taps throttled, the heartbeat
                server.shutdown()
                thread.join(10)
            finally:
                server.server_close()
                service.close()
        finally:
            hardware.close()
    finally:
        publisher.stopped()
        store.close()
    return 0
