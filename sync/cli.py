"""``cardsync``: the sync daemon that runs beside the agent on a terminal.

::

    cardsync run --data-dir DIR --host URL --host-public-key HEX|FILE [--host-public-key ...]
                 [--root-threshold N] [--enrolment-code-file F]
    cardsync status --data-dir DIR                    health figures, no network
    cardsync flush --data-dir DIR                     ask a running daemon to upload now

The clearing host and its operator tools are ``cardhost`` (:mod:`clearinghost.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from agent.blacklist import BLACKLIST_FILE, Blacklist
from agent.clihelp import make_parser, run_command
from agent.clihelp import out as _out
from agent.clock import CLOCK_OFFSET_FILE
from agent.errors import ConfigurationError
from agent.logs import configure_logging
from agent.offline_store import OfflineStore
from agent.wiring import STORE_FILE
from sync.client import ClientTls
from sync.daemon import (
    CHECKS_FILE,
    FLUSH_FLAG_FILE,
    SyncSettings,
    open_daemon,
    read_checks,
    read_clock_offset,
)
from sync.keys import parse_public_key
from sync.protocol import MAX_CODE_LENGTH

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_parser(), argv, configure_logging)


def _parser() -> argparse.ArgumentParser:
    parser = make_parser("cardsync", __doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the sync daemon beside the agent")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--host", required=True, help="clearing host URL")
    p.add_argument(
        "--host-public-key",
        required=True,
        action="append",
        help="the pinned root key: 64 hex digits or a file; repeat for several root keys",
    )
    p.add_argument(
        "--root-threshold",
        type=int,
        default=1,
        help="how many pinned root keys must sign a key rotation (root statement)",
    )
    p.add_argument("--ca", type=Path, help="CA bundle that signed the host's certificate")
    p.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--key", type=Path, help="client certificate key")
    p.add_argument(
        "--enrolment-code-file",
        type=Path,
        help="file holding the one-time enrolment code an operator issued (cardhost terminal "
        "add); read once at start, never logged; not needed once the terminal is enrolled",
    )
    p.add_argument("--upload-interval", type=float, default=30.0)
    p.add_argument("--upload-threshold", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--check-interval", type=float, default=1.0)
    p.add_argument("--blacklist-interval", type=float, default=60.0)
    p.add_argument("--params-interval", type=float, default=300.0)
    p.add_argument("--heartbeat-interval", type=float, default=60.0)
    p.add_argument(
        "--compact-after", default="86400", help="seconds to keep acknowledged records, or never"
    )
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="print the terminal's sync health figures")
    p.add_argument("--data-dir", type=Path, required=True)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("flush", help="ask the running daemon to upload now (flag file)")
    p.add_argument("--data-dir", type=Path, required=True)
    p.set_defaults(func=cmd_flush)

    return parser


def settings_from(args: argparse.Namespace) -> SyncSettings:
    tls = None
    if args.ca or args.cert:
        tls = ClientTls(ca_file=args.ca, cert_file=args.cert, key_file=args.key)
    compact = None if args.compact_after == "never" else float(args.compact_after)
    root_keys = tuple(parse_public_key(k) for k in args.host_public_key)
    return SyncSettings(
        host_url=args.host,
        host_public_key=root_keys[0],
        root_keys=root_keys,
        root_threshold=args.root_threshold,
        upload_interval_s=args.upload_interval,
        upload_threshold=args.upload_threshold,
        batch_size=args.batch_size,
        check_interval_s=args.check_interval,
        blacklist_interval_s=args.blacklist_interval,
        params_interval_s=args.params_interval,
        heartbeat_interval_s=args.heartbeat_interval,
        compact_after_s=compact,
        timeout_s=args.timeout,
        tls=tls,
        enrolment_code=read_enrolment_code(args.enrolment_code_file),
    )


def read_enrolment_code(path: Path | None) -> str | None:
    """The code in ``path`` (first non-blank line), or ``None`` without a file."""
    if path is None:
        return None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"enrolment code file {path}: {exc}") from exc
    code = next((line for line in lines if line), "")
    if not code or len(code) > MAX_CODE_LENGTH:
        raise ConfigurationError(
            f"enrolment code file {path} holds no code (one line, at most {MAX_CODE_LENGTH})"
        )
    return code


def cmd_run(args: argparse.Namespace) -> int:
    daemon = open_daemon(args.data_dir, settings_from(args))
    daemon.run_forever()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = OfflineStore.open_for_reading(args.data_dir / STORE_FILE)
    try:
        oldest = store.oldest_unsent_created_at()
        figures: dict[str, Any] = {
            "terminal_id": store.terminal_id,
            "last_seq": store.last_seq(),
            "acknowledged_seq": store.acknowledged_seq(),
            "unsent_records": store.count_unsent(),
            "quarantined_records": store.count_quarantined(),
            "quarantined_seqs": [q.seq for q in store.quarantined()],
            "oldest_unsent": None if oldest is None else oldest.isoformat(),
            "store_bytes": store.file_size(),
        }
    finally:
        store.close()
    figures.update(
        Blacklist.open(args.data_dir / BLACKLIST_FILE, auto_refresh_s=None, lookups=False).health()
    )
    figures["lists_checked_at"] = read_checks(args.data_dir / CHECKS_FILE)
    # this terminal's clock minus the host's, at the last heartbeat (positive: ahead)
    figures.update(read_clock_offset(args.data_dir / CLOCK_OFFSET_FILE))
    _out(json.dumps(figures, indent=2, ensure_ascii=False))
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    (args.data_dir / FLUSH_FLAG_FILE).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
