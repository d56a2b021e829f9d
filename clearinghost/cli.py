"""``cardhost``: the reference clearing host and its operators' tools.

::

    cardhost host-key --key host.key                  create/show the host's signing key
    cardhost root-key --key root.key                  create/show a root key (keep it offline)
    cardhost root-sign --out root-2.json --version 2 --root-public HEX... [--root-threshold N]
                  --signing-public HEX... --key OLD-ROOT.key --key NEW-ROOT.key
                                                      a key rotation / revocation statement
    cardhost root-sign --add-to root-2.json --key ROOT.key   add one more root signature
    cardhost host --db host.db --key host.key [--listen 127.0.0.1:8700] [--profile P.toml]
                  [--operators-file operators.txt] [--root-statements root-1.json ...]
                  [--approval-threshold 1000] [--max-connections 512] [--body-timeout 60]
                  [--header-timeout 20] [--keep-alive 5] [--fees FEES.json]
                  [--time-zone Asia/Shanghai] [--require-batch-signature]
                  [--max-uploads 8] [--upload-wait 2] [--client-rate 50] [--client-burst 200]
                  [--workers N]   N processes on one address, one database (PostgreSQL)
                  [--db-connections 4]   each process's PostgreSQL connections
    cardhost merchant --host URL [--token-file F] load FILE.csv | list   the merchant register
    cardhost merchant --host URL [--token-file F] bind FILE.csv | terminals
                                                      terminal -> merchant bindings
    cardhost bills --host URL [--token-file F] load FILE.csv | list [--state S] [--account A]
                                                      the utility bill book (一帐通)
    cardhost clear --host URL [--token-file F] --day YYYY-MM-DD [--out FILE.csv]
                                                      clear a day (merchant-alliance 清分)
    cardhost audit --db host.db [--terminal ID]       re-verify stored records (own signatures,
                                                      hashes, chain, batch signatures)
    cardhost operator add|remove|list NAME --role viewer|operator --file operators.txt
    cardhost demo [--data-dir run/demo] [--role bus|fares|pos|kiosk] [--serve]   the whole
                                                      system against simulated cards
    cardhost blacklist --host URL [--token-file F] add|remove CARD...   serials (operator role)
    cardhost blacklist --host URL --printed --issuer CITY|DIALECT add|remove NUMBER...
                     printed card numbers of one issuer (--issuer 5180 or shenzhen-tong)
    cardhost blacklist --host URL --printed list        the listed printed numbers (viewer)
    cardhost blacklist --host URL --printed --unscoped remove NUMBER...   drop a printed
                     number listed before issuer scoping (never published since)
    cardhost approve|reject ID --host URL [--token-file F]   a held blacklist change (another
                                                         operator than the one who asked)
    cardhost terminal --host URL [--token-file F] add ID [--kind K --site S] [--public-key HEX]
    cardhost terminal --host URL [--token-file F] rotate-key ID [--public-key HEX]
    cardhost terminal --host URL [--token-file F] list

Enrolment: ``cardhost terminal add`` creates the terminal's entry and prints its one-time
enrolment code once (or pre-registers the device's public key with ``--public-key``); the
terminal's ``cardsync run --enrolment-code-file`` enrols with it. ``rotate-key`` authorises one
new device key the same way. The host accepts no other registration unless it runs with
``--open-registration`` (first come, first served: development only).

Operator tokens: ``cardhost operator add`` prints a new token once and stores only its hash.
The host reads ``--operators-file`` and/or ``CARDSYNC_OPERATOR_TOKEN`` (one operator);
``cardhost blacklist`` sends ``--token-file``'s first line or ``CARDSYNC_OPERATOR_TOKEN``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import structlog
import uvicorn

from agent.blacklist import asn_of, issuer_code, printed_entry, printed_key
from agent.clihelp import err as _err
from agent.clihelp import make_parser, run_command
from agent.clihelp import out as _out
from agent.errors import ConfigurationError
from agent.logs import configure_logging
from agent.profile import Dialect, load_dialects, load_profile, standard_dialects
from agent.sam.keys import KeySet
from agent.terminal_id import check_terminal_id
from agent.trust import root_payload
from clearinghost.audit import audit_storage
from clearinghost.clearing import DEMO_FACTOR2, TacVerifier
from clearinghost.keys import (
    HostKey,
    add_root_signature,
    check_root_statements,
    sign_root_statement,
)
from clearinghost.load_setup import (
    add_load_options,
    host_answer,
    load_authority_from,
    register_commands,
)
from clearinghost.operators import (
    ROLES,
    TOKEN_ENV,
    Operators,
    add_operator,
    check_exposure,
    read_operators_file,
    read_token,
    remove_operator,
)
from clearinghost.server import (
    DEFAULT_APPROVAL_THRESHOLD,
    ClearingHost,
    HostLimits,
    ServerTls,
    create_app,
    uvicorn_config,
)
from clearinghost.settlement import DEFAULT_TIME_ZONE, FeeSchedule, SettlementError, city_zone
from clearinghost.storage import PG_CONNECTIONS, open_storage
from clearinghost.workers import Supervisor, listening_socket
from sync.keys import parse_public_key

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    parser.set_defaults(raw_argv=arguments)  # what `host --workers N` starts each worker with
    return run_command(parser, arguments, configure_logging)


def _parser() -> argparse.ArgumentParser:
    parser = make_parser("cardhost", __doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("host-key", help="create (if missing) and print the host's public key")
    p.add_argument("--key", type=Path, required=True)
    p.set_defaults(func=cmd_host_key)

    p = sub.add_parser("root-key", help="create (if missing, mode 0600) and print a root key")
    p.add_argument("--key", type=Path, required=True)
    p.set_defaults(func=cmd_host_key)

    p = sub.add_parser("root-sign", help="write or countersign a root statement (key rotation)")
    p.add_argument("--key", type=Path, action="append", required=True, help="root key(s)")
    p.add_argument("--add-to", type=Path, help="an existing statement to countersign in place")
    p.add_argument("--out", type=Path, help="the new statement's file")
    p.add_argument("--version", type=int, help="the statement's version (the last one + 1)")
    p.add_argument("--root-public", action="append", default=[], help="root public key (hex)")
    p.add_argument("--root-threshold", type=int, default=1)
    p.add_argument("--signing-public", action="append", default=[], help="online signing key (hex)")
    p.set_defaults(func=cmd_root_sign)

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
    p.add_argument(
        "--open-registration",
        action="store_true",
        help="DEVELOPMENT ONLY: a terminal without an entry is registered first come, first "
        "served (default: enrolment needs an operator's code or pre-registered key)",
    )
    p.add_argument(
        "--operators-file",
        type=Path,
        help=f"operators (NAME:ROLE:sha256:HEX lines); or {TOKEN_ENV} for one operator",
    )
    p.add_argument("--list-ttl", type=int, default=7 * 24 * 3600, help="seconds")
    p.add_argument(
        "--root-statements",
        type=Path,
        nargs="*",
        default=[],
        help="root statements to serve, in version order (cardhost root-sign)",
    )
    p.add_argument(
        "--fees",
        type=Path,
        help='merchant fee rates, JSON {"rates_bp": {"dining": 225, ...}} (default: city plan)',
    )
    p.add_argument(
        "--time-zone",
        default=DEFAULT_TIME_ZONE,
        help="the city's time zone: a record belongs to the day of its own time there",
    )
    p.add_argument(
        "--approval-threshold",
        type=int,
        default=DEFAULT_APPROVAL_THRESHOLD,
        help="a blacklist change of more entries waits for a second operator's approval",
    )
    defaults = HostLimits()
    p.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="open connections beyond this are answered 503 and closed",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout_s,
        help="seconds a request body may take to arrive (408 after)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout_s,
        help="seconds a connection may take to send a request head (closed after)",
    )
    p.add_argument(
        "--keep-alive",
        type=int,
        default=defaults.keep_alive_s,
        help="seconds an idle keep-alive connection stays open",
    )
    p.add_argument(
        "--require-batch-signature",
        action="store_true",
        help="refuse v1 uploads: every batch must carry the device key's batch signature",
    )
    p.add_argument(
        "--max-uploads",
        type=int,
        default=defaults.max_uploads,
        help="uploads verified and stored at once per process; more wait, then 503 busy",
    )
    p.add_argument(
        "--upload-wait",
        type=float,
        default=defaults.upload_wait_s,
        help="seconds an upload waits for a slot before 503 busy with Retry-After",
    )
    p.add_argument(
        "--client-rate",
        type=float,
        default=defaults.client_rate,
        help="uploads and list pulls a second one terminal may send on average, per process; "
        "more are answered 429 with Retry-After (0: no limit)",
    )
    p.add_argument(
        "--client-burst",
        type=int,
        default=defaults.client_burst,
        help="uploads and list pulls one terminal may send at once before --client-rate applies",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="host processes serving the one address (share --db: use PostgreSQL)",
    )
    p.add_argument(
        "--db-connections",
        type=int,
        default=PG_CONNECTIONS,
        help="PostgreSQL connections each host process keeps at most, for transactions of "
        "different requests side by side (SQLite: one writer at a time, this is ignored)",
    )
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # a worker's socket
    add_load_options(p)
    p.set_defaults(func=cmd_host)

    p = sub.add_parser(
        "audit", help="re-verify stored records: own signatures, hashes, chain, batch signatures"
    )
    p.add_argument("--db", default="host.db", help="SQLite path or postgresql:// DSN")
    p.add_argument("--terminal", help="audit this terminal only")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("operator", help="add, remove or list the host's operators")
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("name", nargs="?")
    p.add_argument("--role", choices=ROLES, default="viewer")
    p.add_argument("--file", type=Path, required=True, help="the host's operators file")
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("demo", help="agent + sync daemon + this host against simulated cards")
    p.add_argument("--data-dir", type=Path, default=Path("run/demo"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--role",
        choices=("bus", "fares", "pos", "kiosk"),
        default="bus",
        help="bus: a validator and a stream of cards; fares: a bus line's fare policy, tap by "
        "tap; pos: a shop counter session and its clearing; kiosk: the kiosk page (top-up, bills)",
    )
    p.add_argument("--serve", action="store_true", help="kiosk: keep the page up until Ctrl-C")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("blacklist", help="publish a blacklist change at a host (admin API)")
    p.add_argument("--host", required=True)
    p.add_argument(
        "--token-file", type=Path, help=f"file holding the operator token (else {TOKEN_ENV})"
    )
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument(
        "--printed",
        action="store_true",
        help="the cards are printed card numbers (decimal, as on the card: 881146306) of the "
        "issuer --issuer names, listed in the printed-number list, a key space of its own",
    )
    p.add_argument(
        "--issuer",
        help="with --printed: the issuer of the numbers, a 4-digit city code (5180) or the "
        "name of a dialect that names its issuer (shenzhen-tong); printed numbers are unique "
        "only within their issuer",
    )
    p.add_argument(
        "--unscoped",
        action="store_true",
        help="with --printed remove: numbers listed before issuer scoping (no issuer)",
    )
    p.add_argument(
        "--dialects",
        type=Path,
        action="append",
        help="dialect files whose issuer_city --issuer may name (default: the shipped "
        "firmware_profiles/dialects/*.toml)",
    )
    p.add_argument("cards", nargs="*", help="card ids (hex application serials) or ASNs")
    p.set_defaults(func=cmd_blacklist)

    p = sub.add_parser("terminal", help="add, list or rotate the key of terminals (admin API)")
    p.add_argument("--host", required=True)
    p.add_argument(
        "--token-file", type=Path, help=f"file holding the operator token (else {TOKEN_ENV})"
    )
    p.add_argument("action", choices=("add", "list", "rotate-key"))
    p.add_argument("terminal_id", nargs="?")
    p.add_argument("--kind", default="", help="bus, metro-gate, kiosk, pos, ...")
    p.add_argument("--site", default="", help="depot, line, station, ...")
    p.add_argument(
        "--public-key", help="pre-register the device's public key (64 hex) instead of a code"
    )
    p.add_argument(
        "--code-ttl", type=int, default=7 * 24 * 3600, help="seconds the code stays valid"
    )
    p.set_defaults(func=cmd_terminal)

    p = sub.add_parser("merchant", help="load or list the merchant register (admin API)")
    p.add_argument("--host", required=True)
    p.add_argument(
        "--token-file", type=Path, help=f"file holding the operator token (else {TOKEN_ENV})"
    )
    p.add_argument("action", choices=("load", "list", "bind", "terminals"))
    p.add_argument(
        "file",
        nargs="?",
        type=Path,
        help="load: register CSV merchant_id,name,category,settlement_account; "
        "bind: CSV terminal_id,merchant_id (a merchant is paid only its own terminals' records)",
    )
    p.set_defaults(func=cmd_merchant)

    p = sub.add_parser("bills", help="load or list the utility bill book (admin API)")
    p.add_argument("--host", required=True)
    p.add_argument(
        "--token-file", type=Path, help=f"file holding the operator token (else {TOKEN_ENV})"
    )
    p.add_argument("action", choices=("load", "list"))
    p.add_argument(
        "file",
        nargs="?",
        type=Path,
        help="bill CSV: bill_id,account,utility,period,amount,merchant_id",
    )
    p.add_argument("--state", choices=("open", "payment_pending", "paid"), help="list only these")
    p.add_argument("--account", help="list only this utility account")
    p.set_defaults(func=cmd_bills)

    p = sub.add_parser("clear", help="clear one day's merchant purchases (admin API)")
    p.add_argument("--host", required=True)
    p.add_argument(
        "--token-file", type=Path, help=f"file holding the operator token (else {TOKEN_ENV})"
    )
    p.add_argument("--day", required=True, help="YYYY-MM-DD, a day over in the city's zone")
    p.add_argument("--out", type=Path, help="write the signed settlement CSV here")
    p.set_defaults(func=cmd_clear)

    register_commands(sub, _admin_call, f"file holding the operator token (else {TOKEN_ENV})")

    for action in ("approve", "reject"):
        p = sub.add_parser(action, help=f"{action} a held blacklist change (a second operator)")
        p.add_argument("--host", required=True)
        p.add_argument(
            "--token-file", type=Path, help=f"file holding the operator token (else {TOKEN_ENV})"
        )
        p.add_argument("change_id", type=int, help="the pending id `cardhost blacklist` showed")
        p.set_defaults(func=cmd_decide, action=action)
    return parser


def cmd_host_key(args: argparse.Namespace) -> int:
    key = HostKey.load_or_create(args.key)
    _out(key.public_key_hex())
    return 0


def cmd_root_sign(args: argparse.Namespace) -> int:
    keys = [HostKey.load(path) for path in args.key]
    if args.add_to is not None:
        data = args.add_to.read_bytes()
        for key in keys:
            data = add_root_signature(data, key)
        _write_private(args.add_to, data)
        return 0
    if args.out is None or args.version is None or not args.root_public or not args.signing_public:
        raise ConfigurationError(
            "root-sign needs --add-to, or --out, --version, --root-public and --signing-public"
        )
    payload = root_payload(
        version=args.version,
        issued_at=int(time.time()),
        root_keys=[parse_public_key(k) for k in args.root_public],
        root_threshold=args.root_threshold,
        signing_keys=[parse_public_key(k) for k in args.signing_public],
    )
    _write_private(args.out, sign_root_statement(payload, keys))
    _err(f"root statement {args.version} written to {args.out}, {len(keys)} signature(s)")
    return 0


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600; a statement is public, but keep key dirs tidy)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def build_host(args: argparse.Namespace, operators: Operators | None = None) -> ClearingHost:
    if operators is None:
        operators = Operators.load(args.operators_file)
    if args.db_connections < 1:
        raise ConfigurationError(
            f"cardhost host: --db-connections must be at least 1, not {args.db_connections}"
        )
    storage = open_storage(args.db, args.db_connections)
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
    key = HostKey.load_or_create(args.key)
    statements = []
    for path in getattr(args, "root_statements", []):
        try:
            statements.append(path.read_bytes())
        except OSError as exc:
            raise ConfigurationError(f"root statement {path} is unreadable: {exc}") from exc
    check_root_statements(statements, key)
    return ClearingHost(
        storage,
        key,
        root_statements=tuple(statements),
        tac=tac,
        list_ttl_s=args.list_ttl,
        open_registration=args.open_registration,
        operators=operators,
        limits=host_limits(args),
        approval_threshold=args.approval_threshold,
        **clearing_settings(args),
        loads=load_authority_from(args),
        require_batch_signature=getattr(args, "require_batch_signature", False),
    )


def clearing_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--fees`` and ``--time-zone``, validated (a bad one stops the host from starting)."""
    fees = FeeSchedule()
    path: Path | None = getattr(args, "fees", None)
    try:
        if path is not None:
            try:
                fees = FeeSchedule.from_mapping(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                if isinstance(exc, SettlementError):
                    raise
                raise ConfigurationError(f"fee schedule {path}: unreadable: {exc}") from exc
        zone = getattr(args, "time_zone", DEFAULT_TIME_ZONE)
        city_zone(zone)
    except SettlementError as exc:
        raise ConfigurationError(f"{path or 'cardhost host'}: {exc}") from exc
    return {"fees": fees, "time_zone": zone}


def host_limits(args: argparse.Namespace) -> HostLimits:
    try:
        return HostLimits(
            body_timeout_s=args.body_timeout,
            header_timeout_s=args.header_timeout,
            keep_alive_s=args.keep_alive,
            max_connections=args.max_connections,
            max_uploads=args.max_uploads,
            upload_wait_s=args.upload_wait,
            client_rate=args.client_rate,
            client_burst=args.client_burst,
            # a worker of --workers N sheds busy connections to the other workers
            close_busy_connections=getattr(args, "listen_fd", None) is not None,
        )
    except ValueError as exc:
        raise ConfigurationError(f"cardhost host: {exc}") from exc


def cmd_host(args: argparse.Namespace) -> int:
    address, _, port = args.listen.rpartition(":")
    tls = None
    if args.tls_cert is not None:
        if args.tls_key is None:
            raise ConfigurationError("--tls-cert needs --tls-key")
        tls = ServerTls(args.tls_cert, args.tls_key, args.client_ca)
    operators = Operators.load(args.operators_file)
    check_exposure(address or "127.0.0.1", tls=tls is not None, operators=operators)
    if not operators:
        log.warning("no operators configured: the read API, the page and admin answer 401")
    if args.workers < 1:
        raise ConfigurationError(f"cardhost host: --workers must be at least 1, not {args.workers}")
    host = build_host(args, operators)
    if args.workers > 1 and args.listen_fd is None:
        # the supervisor: the configuration (storage, schema, key) is checked and the key
        # created once, here, before the workers start; then it only keeps them running
        host.storage.close()
        sock = listening_socket(address or "127.0.0.1", int(port))
        log.info(
            "clearing host listening",
            listen=args.listen,
            workers=args.workers,
            key_id=host.key.key_id,
            public_key=host.key.public_key_hex(),
        )
        return Supervisor(args.raw_argv, sock, args.workers).run()
    config = uvicorn_config(create_app(host), tls=tls, log_level="warning", limits=host.limits)
    config.host, config.port = address or "127.0.0.1", int(port)
    if args.listen_fd is not None:  # a worker of `--workers N`: the supervisor's socket
        inherited = socket.socket(fileno=args.listen_fd)
        log.info("worker serving", listen=args.listen, storage=host.storage.backend)
        asyncio.run(uvicorn.Server(config).serve(sockets=[inherited]))
        host.storage.close()
        return 0
    log.info(
        "clearing host listening",
        listen=args.listen,
        storage=host.storage.backend,
        key_id=host.key.key_id,
        public_key=host.key.public_key_hex(),
        tls=tls is not None,
        mutual_tls=bool(tls and tls.client_ca_file),
        operators=operators.names,
        approval_threshold=host.approval_threshold,
        limits=host.limits,
    )
    asyncio.run(uvicorn.Server(config).serve())
    host.storage.close()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Re-verify what the host stored since the last audit (``clearinghost.audit``); prints a
    JSON report; exit 1 when anything was flagged (the findings are anomalies too)."""
    storage = open_storage(args.db)
    try:
        if args.terminal is not None:
            check_terminal_id(args.terminal)
        report = audit_storage(storage, args.terminal)
    finally:
        storage.close()
    _out(json.dumps(report.as_dict(), ensure_ascii=False, indent=2))
    return 1 if report.findings else 0


def cmd_operator(args: argparse.Namespace) -> int:
    if args.action == "list":
        for operator in read_operators_file(args.file) if args.file.exists() else []:
            _out(f"{operator.name}\t{operator.role}")
        return 0
    if not args.name:
        raise ConfigurationError(f"cardhost operator {args.action} needs a NAME")
    if args.action == "remove":
        if not args.file.exists() or not remove_operator(args.file, args.name):
            _err(f"cardhost: no operator {args.name!r} in {args.file}")
            return 1
        return 0
    token = add_operator(args.file, args.name, args.role)
    _err(f"operator {args.name!r} ({args.role}) added to {args.file}; its token, shown once:")
    _out(token)
    return 0


SHIPPED_DIALECTS = Path(__file__).resolve().parent.parent / "firmware_profiles" / "dialects"


def resolve_issuer(issuer: str, dialect_files: Sequence[Path] | None = None) -> str:
    """The city code ``--issuer`` names: a 4-digit city code as it is, or the ``issuer_city``
    of the dialect of that name (in ``dialect_files``, default the shipped ones). Raises
    ConfigurationError saying what is known for anything else."""
    text = issuer.strip()
    if text.isascii() and text.isdigit():
        try:
            return issuer_code(text)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    files = list(dialect_files) if dialect_files else sorted(SHIPPED_DIALECTS.glob("*.toml"))
    dialects: list[Dialect] = list(standard_dialects())
    for path in files:
        dialects.extend(load_dialects(path))
    named = {d.name: d.issuer_city for d in dialects if d.issuer_city}
    if text in named:
        return named[text]
    if any(d.name == text for d in dialects):
        raise ConfigurationError(
            f"issuer {issuer!r}: that dialect names no issuer_city, its cards give their own "
            "city code (cardagent card read shows it): give that 4-digit code"
        )
    known = ", ".join(f"{n} ({c})" for n, c in sorted(named.items())) or "none"
    raise ConfigurationError(
        f"unknown issuer {issuer!r}: give a 4-digit city code or a dialect that names its "
        f"issuer ({known})"
    )


def cmd_blacklist(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list_printed(args)
    if not args.cards:
        raise ConfigurationError(f"cardhost blacklist {args.action} needs at least one card")
    if (args.issuer or args.unscoped) and not args.printed:
        raise ConfigurationError("--issuer and --unscoped go with --printed")
    adding = args.action == "add"
    body: dict[str, list[Any]] = {"add": [], "remove": []}
    if args.printed and args.unscoped:
        if adding or args.issuer:
            raise ConfigurationError(
                "--unscoped only removes numbers listed before issuer scoping; a number is "
                "added with --issuer"
            )
        for card in args.cards:
            if not (card.isascii() and card.isdigit() and len(card) <= 19):
                raise ConfigurationError(f"printed card number {card!r} is not 1 to 19 digits")
        body["printed_remove_unscoped"] = list(args.cards)
    elif args.printed:
        if not args.issuer:
            raise ConfigurationError(
                "--printed needs --issuer (a 4-digit city code such as 5180, or a dialect name "
                "such as shenzhen-tong): printed numbers are unique only within their issuer"
            )
        code = resolve_issuer(args.issuer, args.dialects)
        entries = []
        for card in args.cards:
            try:
                issuer, number = printed_entry(printed_key(code, card))
            except ValueError as exc:
                _err(f"cardhost: {exc}")
                return 2
            entries.append({"issuer": issuer, "number": number})
        body["printed_add" if adding else "printed_remove"] = entries
    else:
        body["add" if adding else "remove"] = [f"{asn_of(card):016X}" for card in args.cards]
    response = _admin_call(args, "POST", "/v1/admin/blacklist", body)
    if response is None:
        return 2
    _out(response.text)
    if response.status_code == 202:
        change = response.json().get("pending_id")
        _err(
            f"cardhost: change {change} is held: another operator must run "
            f"`cardhost approve {change} --host {args.host}` (or reject it)"
        )
    return 0 if response.status_code in (200, 202) else 2


def _list_printed(args: argparse.Namespace) -> int:
    """``cardhost blacklist --printed list``: one line per entry, issuer then number."""
    if not args.printed:
        raise ConfigurationError("cardhost blacklist list shows the printed-number list: --printed")
    listing = _admin_answer(args, "GET", "/v1/admin/blacklist/printed", None)
    if listing is None:
        return 2
    _out(f"# version {listing['version']}: issuer\tprinted number")
    for entry in listing["printed"]:
        _out(f"{entry['issuer']}\t{entry['number']}")
    for number in listing["unscoped"]:
        _out(f"unscoped\t{number}")
    if listing["unscoped"]:
        _err(
            f"cardhost: {len(listing['unscoped'])} printed numbers were listed before issuer "
            "scoping and are published to no terminal: list each again with --issuer, then "
            "drop the old entry with --printed --unscoped remove"
        )
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    path = f"/v1/admin/blacklist/pending/{args.change_id}/{args.action}"
    response = _admin_call(args, "POST", path, {})
    if response is None:
        return 2
    _out(response.text)
    return 0 if response.status_code == 200 else 2


def cmd_terminal(args: argparse.Namespace) -> int:
    if args.action == "list":
        answer = _admin_answer(args, "GET", "/v1/admin/terminals", None)
        if answer is None:
            return 2
        for t in answer["terminals"]:
            state = "enrolled" if t["enrolled"] else "not enrolled"
            pending = [n for n, p in (("code", t["code_pending"]), ("key", t["key_pending"])) if p]
            if pending:
                state += f", {' and '.join(pending)} pending"
            _out(f"{t['terminal_id']}\t{t['kind']}\t{t['site']}\t{state}\t{t['key_id'] or '-'}")
        return 0
    if not args.terminal_id:
        raise ConfigurationError(f"cardhost terminal {args.action} needs a terminal id")
    check_terminal_id(args.terminal_id)
    body: dict[str, Any] = {"code_ttl_s": args.code_ttl}
    if args.public_key:
        body["public_key"] = args.public_key
    if args.action == "add":
        body.update(terminal_id=args.terminal_id, kind=args.kind, site=args.site)
        path = "/v1/admin/terminals"
    else:
        path = f"/v1/admin/terminals/{args.terminal_id}/rotate-key"
    answer = _admin_answer(args, "POST", path, body, ok=(200, 201))
    if answer is None:
        return 2
    what = "enrolment" if args.action == "add" else "key rotation"
    if "enrolment_code" in answer:
        expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(answer["code_expires_at"]))
        _err(
            f"{what} of {args.terminal_id} authorised; its one-time code, shown once, valid "
            f"until {expires} (give it to the terminal: cardsync run --enrolment-code-file):"
        )
        _out(answer["enrolment_code"])
    else:
        _err(f"{what} of {args.terminal_id} authorised for device key {answer['public_key']}")
    return 0


def cmd_merchant(args: argparse.Namespace) -> int:
    if args.action == "list":
        answer = _admin_answer(args, "GET", "/v1/admin/merchants", None)
        if answer is None:
            return 2
        for m in answer["merchants"]:
            _out(f"{m['merchant_id']}\t{m['category']}\t{m['settlement_account']}\t{m['name']}")
        return 0
    if args.action == "terminals":
        answer = _admin_answer(args, "GET", "/v1/admin/merchant-terminals", None)
        if answer is None:
            return 2
        for t in answer["terminals"]:
            _out(f"{t['terminal_id']}\t{t['merchant_id']}")
        return 0
    if args.file is None:
        raise ConfigurationError(f"cardhost merchant {args.action} needs a CSV file")
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{args.file}: unreadable: {exc}") from exc
    path = "/v1/admin/merchants" if args.action == "load" else "/v1/admin/merchant-terminals"
    response = _admin_call(args, "POST", path, {"csv": text})
    if response is None:
        return 2
    if response.status_code != 200:
        _err(f"cardhost: {args.file} refused ({response.status_code}): {response.text[:2000]}")
        return 2
    answer = response.json()
    if args.action == "load":
        _err(f"{args.file}: {answer['added']} merchants added, {answer['updated']} updated")
    else:
        _err(f"{args.file}: {answer['bound']} terminals bound, {answer['moved']} moved")
    return 0


def cmd_bills(args: argparse.Namespace) -> int:
    if args.action == "list":
        query = "&".join(
            f"{name}={value}"
            for name, value in (("state", args.state), ("account", args.account))
            if value
        )
        path = "/v1/admin/bills" + (f"?{query}" if query else "")
        answer = _admin_answer(args, "GET", path, None)
        if answer is None:
            return 2
        _out("bill_id\taccount\tutility\tperiod\tamount\tstate\tdetail")
        for b in answer["bills"]:
            _out(
                f"{b['bill_id']}\t{b['account']}\t{b['utility']}\t{b['period']}\t"
                f"{b['amount']}\t{b['state']}\t{b['detail']}"
            )
        return 0
    if args.file is None:
        raise ConfigurationError("cardhost bills load needs the bill CSV file")
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{args.file}: unreadable: {exc}") from exc
    response = _admin_call(args, "POST", "/v1/admin/bills", {"csv": text})
    if response is None:
        return 2
    if response.status_code != 200:
        try:
            detail = str(response.json().get("detail", response.text))
        except ValueError:
            detail = response.text
        _err(f"cardhost: {args.file} refused ({response.status_code}): {detail[:4000]}")
        return 2
    answer = response.json()
    _err(
        f"{args.file}: {answer['added']} bills added, {answer['updated']} updated, "
        f"{answer['kept']} kept (being paid or paid)"
    )
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    answer = _admin_answer(args, "POST", f"/v1/admin/clearing/{args.day}", {}, ok=(200, 201))
    if answer is None:
        return 2
    totals = answer["totals"]
    state = "new version" if answer["changed"] else "unchanged since"
    _err(
        f"{answer['day']} {state} v{answer['version']}: purchases {totals['purchases']} fen, "
        f"fees {totals['fees']}, commissions {totals['commissions']}, net {totals['net']}, "
        f"to pay now {totals['to_pay']}; credits owed {totals['credits_owed']}, unresolved "
        f"{totals['unresolved']}, unassigned {totals['unassigned']}, unbound "
        f"{totals['unbound']}"
    )
    if args.out is not None:
        path = f"/v1/admin/clearing/{args.day}/file?version={answer['version']}"
        file = _admin_call(args, "GET", path, None)
        if file is None or file.status_code != 200:
            _err("cardhost: the settlement file could not be fetched")
            return 2
        args.out.write_bytes(file.content)
        _err(
            f"settlement file written to {args.out}; "
            f"signature {file.headers['x-settlement-signature']}"
        )
    _out(json.dumps(answer, ensure_ascii=False, indent=2))
    return 0


def _admin_answer(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    ok: tuple[int, ...] = (200,),
) -> Any:
    """The JSON answer of one admin call, or ``None`` once a link error or another status has
    been reported."""
    return host_answer(_admin_call(args, method, path, body), *ok)


def _admin_call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None
) -> httpx.Response | None:
    """One call to the host's admin API with the operator token (``None``: link error)."""
    token = read_token(args.token_file)
    if token is None:
        raise ConfigurationError(f"an operator token is needed: --token-file or {TOKEN_ENV}")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        return httpx.request(
            method, f"{args.host.rstrip('/')}{path}", json=body, headers=headers, timeout=30
        )
    except httpx.HTTPError as exc:
        _err(f"cardhost: link error: {exc}")
        return None


def cmd_demo(args: argparse.Namespace) -> int:
    from clearinghost.demo import run_demo  # pulls in the simulators; keep them off host's path

    if args.role == "fares":
        from clearinghost.demo_fares import run_fares_demo

        return run_fares_demo(args.data_dir)
    if args.role == "pos":
        from clearinghost.demo_pos import run_pos_demo

        return run_pos_demo(args.data_dir, seed=args.seed)
    if args.role == "kiosk":
        from clearinghost.demo_kiosk import run_kiosk_demo

        return run_kiosk_demo(args.data_dir, serve=args.serve)
    return run_demo(args.data_dir, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
