"""``cardsync``: the sync daemon, the reference clearing host, and small operator tools.

::

    cardsync host-key --key host.key                  create/show the host's signing key
    cardsync host --db host.db --key host.key [--listen 127.0.0.1:8700] [--profile P.toml]
    cardsync run --data-dir DIR --host URL --host-public-key HEX|FILE
    cardsync status --data-dir DIR                    health figures, no network
    cardsync flush --data-dir DIR                     ask a running daemon to upload now
    cardsync blacklist --host URL add|remove CARD...  publish a blacklist change (admin)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import structlog
import uvicorn

from agent.blacklist import BLACKLIST_FILE, Blacklist, asn_of
from agent.errors import AgentError, ConfigurationError
from agent.logs import configure_logging
from agent.offline_store import OfflineStore
from agent.profile import load_profile
from agent.sam.keys import KeySet
from agent.wiring import STORE_FILE
from sync.clearing import DEMO_FACTOR2, TacVerifier
from sync.client import ClientTls
from sync.daemon import FLUSH_FLAG_FILE, SyncSettings, open_daemon
from sync.host import ClearingHost, ServerTls, create_app, uvicorn_config
from sync.keys import HostKey, parse_public_key
from sync.storage import open_storage

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args))
    except AgentError as exc:
        _err(f"cardsync: {exc.party} error: {exc}")
        return 2


def _out(text: str) -> None:
    """For the operator: standard output (logs go to standard error)."""
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cardsync", description=__doc__)
    parser.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("host-key", help="create (if missing) and print the host's public key")
    p.add_argument("--key", type=Path, required=True)
    p.set_defaults(func=cmd_host_key)

    p = sub.add_parser("host", help="run the reference clearing host")
    p.add_argument("--db", default="host.db", help="SQLite path or postgresql:// DSN")
    p.add_argument("--key", type=Path, required=True, help="host signing key (created if absent)")
    p.add_argument("--listen", default="127.0.0.1:8700", help="HOST:PORT")
    p.add_argument("--profile", type=Path, help="test profile whose test_keys verify TACs")
    p.add_argument(
        "--demo-factors",
        action="store_true",
        help="use the simulated demo cards' F2 factors for TACs (test data)",
    )
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--client-ca", type=Path, help="require client certificates from this CA")
    p.add_argument("--closed-registration", action="store_true")
    p.add_argument("--admin-token")
    p.add_argument("--list-ttl", type=int, default=7 * 24 * 3600, help="seconds")
    p.set_defaults(func=cmd_host)

    p = sub.add_parser("run", help="run the sync daemon beside the agent")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--host", required=True, help="clearing host URL")
    p.add_argument("--host-public-key", required=True, help="64 hex digits or a file")
    p.add_argument("--ca", type=Path, help="CA bundle that signed the host's certificate")
    p.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--key", type=Path, help="client certificate key")
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

    p = sub.add_parser("blacklist", help="publish a blacklist change at a host (admin API)")
    p.add_argument("--host", required=True)
    p.add_argument("--admin-token")
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("cards", nargs="+", help="card ids (hex application serials) or ASNs")
    p.set_defaults(func=cmd_blacklist)
    return parser


def cmd_host_key(args: argparse.Namespace) -> int:
    key = HostKey.load_or_create(args.key)
    _out(key.public_key_hex())
    return 0


def build_host(args: argparse.Namespace) -> ClearingHost:
    storage = open_storage(args.db)
    tac = None
    if args.profile is not None:
        profile = load_profile(args.profile)
        if not profile.test_keys:
            raise ConfigurationError(f"{args.profile}: no test_keys to verify TACs with")
        tac = TacVerifier(
            KeySet.from_mapping(profile.test_keys),
            DEMO_FACTOR2 if args.demo_factors else {},
            apdu_order_card_first=profile.factor_order_card_first,
        )
    return ClearingHost(
        storage,
        HostKey.load_or_create(args.key),
        tac=tac,
        list_ttl_s=args.list_ttl,
        open_registration=not args.closed_registration,
        admin_token=args.admin_token,
    )


def cmd_host(args: argparse.Namespace) -> int:
    host = build_host(args)
    address, _, port = args.listen.rpartition(":")
    tls = None
    if args.tls_cert is not None:
        if args.tls_key is None:
            raise ConfigurationError("--tls-cert needs --tls-key")
        tls = ServerTls(args.tls_cert, args.tls_key, args.client_ca)
    config = uvicorn_config(create_app(host), tls=tls, log_level="warning")
    config.host, config.port = address or "127.0.0.1", int(port)
    log.info(
        "clearing host listening",
        listen=args.listen,
        storage=host.storage.backend,
        key_id=host.key.key_id,
        public_key=host.key.public_key_hex(),
        tls=tls is not None,
        mutual_tls=bool(tls and tls.client_ca_file),
    )
    asyncio.run(uvicorn.Server(config).serve())
    host.storage.close()
    return 0


def settings_from(args: argparse.Namespace) -> SyncSettings:
    tls = None
    if args.ca or args.cert:
        tls = ClientTls(ca_file=args.ca, cert_file=args.cert, key_file=args.key)
    compact = None if args.compact_after == "never" else float(args.compact_after)
    return SyncSettings(
        host_url=args.host,
        host_public_key=parse_public_key(args.host_public_key),
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
    )


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
            "oldest_unsent": None if oldest is None else oldest.isoformat(),
            "store_bytes": store.file_size(),
        }
    finally:
        store.close()
    figures.update(Blacklist.open(args.data_dir / BLACKLIST_FILE, auto_refresh_s=None).health())
    _out(json.dumps(figures, indent=2, ensure_ascii=False))
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    (args.data_dir / FLUSH_FLAG_FILE).touch()
    return 0


def cmd_blacklist(args: argparse.Namespace) -> int:
    asns = [f"{asn_of(card):016X}" for card in args.cards]
    body = {"add": asns if args.action == "add" else [], "remove": asns * (args.action == "remove")}
    headers = {"Authorization": f"Bearer {args.admin_token}"} if args.admin_token else {}
    try:
        response = httpx.post(
            f"{args.host.rstrip('/')}/v1/admin/blacklist", json=body, headers=headers, timeout=10
        )
    except httpx.HTTPError as exc:
        _err(f"cardsync: link error: {exc}")
        return 2
    _out(response.text)
    return 0 if response.status_code == 200 else 2


if __name__ == "__main__":
    sys.exit(main())
