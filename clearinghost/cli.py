"""``cardhost``: the reference clearing host and its operators' tools.

::

    cardhost host-key --key host.key                  create/show the host's signing key
    cardhost host --db host.db --key host.key [--listen 127.0.0.1:8700] [--profile P.toml]
                  [--operators-file operators.txt] [--approval-threshold 1000]
                  [--max-connections 512] [--body-timeout 60] [--header-timeout 20]
                  [--keep-alive 5]
    cardhost operator add|remove|list NAME --role viewer|operator --file operators.txt
    cardhost demo [--data-dir run/demo]                 the whole system against simulated cards
    cardhost blacklist --host URL [--token-file F] add|remove CARD...   (operator role)
    cardhost approve|reject ID --host URL [--token-file F]   a held blacklist change (another
                                                         operator than the one who asked)

Operator tokens: ``cardhost operator add`` prints a new token once and stores only its hash.
The host reads ``--operators-file`` and/or ``CARDSYNC_OPERATOR_TOKEN`` (one operator);
``cardhost blacklist`` sends ``--token-file``'s first line or ``CARDSYNC_OPERATOR_TOKEN``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
import structlog
import uvicorn

from agent.blacklist import asn_of
from agent.errors import AgentError, ConfigurationError
from agent.logs import configure_logging
from agent.profile import load_profile
from agent.sam.keys import KeySet
from clearinghost.clearing import DEMO_FACTOR2, TacVerifier
from clearinghost.keys import HostKey
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
from clearinghost.storage import open_storage

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args))
    except AgentError as exc:
        _err(f"cardhost: {exc.party} error: {exc}")
        return 2


def _out(text: str) -> None:
    """For the operator: standard output (logs go to standard error)."""
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cardhost", description=__doc__)
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
    p.add_argument(
        "--operators-file",
        type=Path,
        help=f"operators (NAME:ROLE:sha256:HEX lines); or {TOKEN_ENV} for one operator",
    )
    p.add_argument("--list-ttl", type=int, default=7 * 24 * 3600, help="seconds")
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
    p.set_defaults(func=cmd_host)

    p = sub.add_parser("operator", help="add, remove or list the host's operators")
    p.add_argument("action", choices=("add", "remove", "list"))
    p.add_argument("name", nargs="?")
    p.add_argument("--role", choices=ROLES, default="viewer")
    p.add_argument("--file", type=Path, required=True, help="the host's operators file")
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("demo", help="agent + sync daemon + this host against simulated cards")
    p.add_argument("--data-dir", type=Path, default=Path("run/demo"))
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("blacklist", help="publish a blacklist change at a host (admin API)")
    p.add_argument("--host", required=True)
    p.add_argument(
        "--token-file", type=Path, help=f"file holding the operator token (else {TOKEN_ENV})"
    )
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("cards", nargs="+", help="card ids (hex application serials) or ASNs")
    p.set_defaults(func=cmd_blacklist)

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


def build_host(args: argparse.Namespace, operators: Operators | None = None) -> ClearingHost:
    if operators is None:
        operators = Operators.load(args.operators_file)
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
        operators=operators,
        limits=host_limits(args),
        approval_threshold=args.approval_threshold,
    )


def host_limits(args: argparse.Namespace) -> HostLimits:
    try:
        return HostLimits(
            body_timeout_s=args.body_timeout,
            header_timeout_s=args.header_timeout,
            keep_alive_s=args.keep_alive,
            max_connections=args.max_connections,
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
    host = build_host(args, operators)
    config = uvicorn_config(create_app(host), tls=tls, log_level="warning", limits=host.limits)
    config.host, config.port = address or "127.0.0.1", int(port)
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


def cmd_blacklist(args: argparse.Namespace) -> int:
    asns = [f"{asn_of(card):016X}" for card in args.cards]
    body = {"add": asns if args.action == "add" else [], "remove": asns * (args.action == "remove")}
    response = _admin_post(args, "/v1/admin/blacklist", body)
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


def cmd_decide(args: argparse.Namespace) -> int:
    path = f"/v1/admin/blacklist/pending/{args.change_id}/{args.action}"
    response = _admin_post(args, path, {})
    if response is None:
        return 2
    _out(response.text)
    return 0 if response.status_code == 200 else 2


def _admin_post(args: argparse.Namespace, path: str, body: object) -> httpx.Response | None:
    token = read_token(args.token_file)
    if token is None:
        raise ConfigurationError(f"an operator token is needed: --token-file or {TOKEN_ENV}")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        return httpx.post(f"{args.host.rstrip('/')}{path}", json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        _err(f"cardhost: link error: {exc}")
        return None


def cmd_demo(args: argparse.Namespace) -> int:
    from clearinghost.demo import run_demo  # pulls in the simulators; keep them off host's path

    return run_demo(args.data_dir, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
