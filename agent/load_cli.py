"""``cardagent load``: one online load (圈存) on the next card, from the command line.

A kiosk without its page, for a technician or a script: waits for a card on the profile's reader
(or ``--reader-url``), settles that card's torn loads from the journal of ``--data-dir`` (its
online counter and GET TRANSACTION PROVE), then loads ``--amount`` fen authorised by the
clearing host ``--host`` (requests signed with the data directory's device key), paid by cash
the kiosk accepted, a voucher (``--voucher CODE``) or a pending load of the card (``--pending
ID``). ``--load-key`` is the idempotency key the host knows the load by: the same key after a
crash, a timeout or a removed card never loads twice. Prints the outcome as one JSON line; exit
0 when the card holds the load (``loaded`` or ``recovered``), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from agent.clihelp import out
from agent.errors import ConfigurationError, ReaderTimeout
from agent.offline_store import DeviceKey
from agent.profile import load_profile
from agent.tap.load import KioskLoader
from agent.tap.load_http import HttpLoadHost
from agent.wiring import DEVICE_KEY_FILE, DataDir, open_card_reader


def register(sub: Any, default_data_dir: Path) -> None:
    p = sub.add_parser("load", help="one online load (圈存) on the next card (kiosk back end)")
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=default_data_dir)
    p.add_argument("--reader-url", help="override the profile's reader URL")
    p.add_argument("--host", required=True, help="clearing host URL")
    p.add_argument("--amount", type=int, required=True, help="fen")
    p.add_argument("--load-key", required=True, help="idempotency key (1..128 of A-Z a-z 0-9 ._-)")
    p.add_argument(
        "--terminal-number", required=True, help="the kiosk's 6-byte terminal number (12 hex)"
    )
    paid = p.add_mutually_exclusive_group()
    paid.add_argument("--voucher", help="a top-up voucher code (他充)")
    paid.add_argument("--pending", help="the id of a pending load of this card")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a card")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per host request")
    p.set_defaults(func=cmd_load)


def _terminal_number(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 6:
        raise ConfigurationError(f"--terminal-number {text!r}: 12 hex digits expected")
    return value


def cmd_load(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    terminal = _terminal_number(args.terminal_number)
    if args.voucher:
        payment: dict[str, Any] = {"kind": "voucher", "code": args.voucher}
    elif args.pending:
        payment = {"kind": "pending", "id": args.pending}
    else:
        payment = {"kind": "cash", "amount": args.amount}
    data_dir = DataDir(args.data_dir)
    store = data_dir.open_store()  # refuses an unsafe directory or key
    device_key = DeviceKey.load(data_dir.path / DEVICE_KEY_FILE)
    host = HttpLoadHost(args.host, data_dir.terminal_id(), device_key, timeout_s=args.timeout)
    reader = open_card_reader(profile, args.reader_url)
    try:
        if reader.wait_for_card(args.wait) is None:
            raise ReaderTimeout(f"{reader.name}: no card within {args.wait:g} s")
        loader = KioskLoader(profile, store, host, terminal)
        result = loader.load(reader, args.amount, payment, args.load_key)
    finally:
        reader.close()
        host.close()
        store.close()
    out(
        json.dumps(
            {
                "status": result.status,
                "card_id": result.card_id,
                "balance_after": result.balance_after,
                "tac": result.tac,
                "reason": result.reason,
                "settled": list(result.settled),
            },
            ensure_ascii=False,
        )
    )
    return 0 if result.status in ("loaded", "recovered") else 1
