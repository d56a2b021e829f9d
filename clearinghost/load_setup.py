"""``cardhost`` options and commands for online loads (圈存).

``cardhost host``: ``--loads-db PATH|DSN`` turns the load routes on (a SQLite file, or a
PostgreSQL DSN ``postgresql://…`` / ``host=… dbname=…``). Keys: ``--load-keys test`` (the
software store with the test load masters and the TAC master of ``--profile``'s test keys: demo
and tests only) or ``--load-keys pkcs11`` with ``--pkcs11-lib``, ``--pkcs11-token`` and the user
PIN in the environment variable ``--pkcs11-pin-env`` names (never on the command line). The
purse limit is the profile's ``terminal.max_balance``; ``--load-issuers`` lists the issuer
prefixes (hex, as the profile's ``issuer_allow_list``) whose cards this host loads: a card of
another city is refused ``not_loadable_here``.

Operator commands (admin API, operator token): ``cardhost loads list [--unresolved | --state
S]``, ``cardhost loads credit --card ASN --amount FEN [--source employer|group|online|other]
[--reference TEXT]`` (a pending load, loadable once at any kiosk), ``cardhost loads pending
[--card ASN] [--all]``, ``cardhost loads resolve --load-key K --outcome credited|not_credited
--reason TEXT`` (an operator's decision on an unresolved load), ``cardhost loads unfinished``
(trips left to the host's correction by the fare policy's ``unfinished: "host"`` rule),
``cardhost loads correct --terminal T --seq N --amount FEN --reason TEXT`` (the host's
correction of one: a pending load for its card, once per record), ``cardhost vouchers issue
--amount FEN [--count N]``, ``cardhost vouchers list``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from agent.clihelp import err, out
from agent.errors import ConfigurationError
from agent.profile import load_profile
from agent.sam.keys import KeySet
from clearinghost.keystore import KeyStore, SoftwareKeyStore, load_test_keys
from clearinghost.keystore_pkcs11 import Pkcs11KeyStore
from clearinghost.loads import PENDING_SOURCES, LoadAuthority

DEFAULT_MAX_BALANCE = 100000  # fen; a profile's terminal.max_balance overrides it

AdminCall = Callable[
    [argparse.Namespace, str, str, "dict[str, Any] | None"], "httpx.Response | None"
]


def add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads-db", help="online loads (圈存): SQLite file or postgresql:// DSN")
    parser.add_argument("--load-keys", choices=("test", "pkcs11"), default="test")
    parser.add_argument("--pkcs11-lib", help="PKCS#11 module, e.g. libsofthsm2.so")
    parser.add_argument("--pkcs11-token", help="token label")
    parser.add_argument(
        "--pkcs11-pin-env", default="CARDHOST_PKCS11_PIN", help="environment variable of the PIN"
    )
    parser.add_argument(
        "--load-issuers",
        default="",
        help="comma-separated issuer prefixes (hex) whose cards this host loads; empty: any",
    )


def load_authority_from(args: argparse.Namespace) -> LoadAuthority | None:
    location: str | Path | None = getattr(args, "loads_db", None)
    if location is None:
        return None
    max_balance = DEFAULT_MAX_BALANCE
    keys = KeySet(load_test_keys())
    order = True
    sm4_variant = "pad80"
    if args.profile is not None:
        profile = load_profile(args.profile)
        max_balance = profile.max_balance
        order = profile.factor_order_card_first
        sm4_variant = profile.sm4_load_session_key
        keys = KeySet([*KeySet.from_mapping(profile.test_keys or {"keys": []}), *keys])
    issuers = [i.strip() for i in str(getattr(args, "load_issuers", "") or "").split(",")]
    issuers = [i for i in issuers if i]
    for issuer in issuers:
        try:
            bytes.fromhex(issuer if len(issuer) % 2 == 0 else issuer + "0")
        except ValueError as exc:
            raise ConfigurationError(f"--load-issuers: {issuer!r} is not hex") from exc
    store: KeyStore
    if args.load_keys == "pkcs11":
        pin = os.environ.get(args.pkcs11_pin_env)
        if not args.pkcs11_lib or not args.pkcs11_token or not pin:
            raise ConfigurationError(
                f"--load-keys pkcs11 needs --pkcs11-lib, --pkcs11-token and ${args.pkcs11_pin_env}"
            )
        store = Pkcs11KeyStore(
            args.pkcs11_lib,
            args.pkcs11_token,
            pin,
            apdu_order_card_first=order,
            sm4_load_session_key=sm4_variant,
        )
    else:
        store = SoftwareKeyStore(
            keys, apdu_order_card_first=order, sm4_load_session_key=sm4_variant
        )
    path = location if str(location).startswith(("postgres", "host=")) else Path(location)
    return LoadAuthority(path, store, max_balance=max_balance, issuers=issuers)


# --- operator commands ------------------------------------------------------------------------


def register_commands(sub: Any, admin_call: AdminCall, token_help: str) -> None:
    """``cardhost loads …`` and ``cardhost vouchers …`` (admin API)."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", required=True)
        p.add_argument("--token-file", type=Path, help=token_help)

    p = sub.add_parser("loads", help="online loads: unresolved ones, pending loads (admin API)")
    common(p)
    p.add_argument(
        "action", choices=("list", "credit", "pending", "resolve", "unfinished", "correct")
    )
    p.add_argument("--unresolved", action="store_true", help="list: loads whose money is held")
    p.add_argument("--state", help="list: only loads in this state")
    p.add_argument("--card", help="credit, pending: the card's ASN (16 hex digits)")
    p.add_argument("--amount", type=int, help="credit, correct: fen")
    p.add_argument("--source", choices=PENDING_SOURCES, default="other")
    p.add_argument("--reference", default="", help="credit: the payer's reference")
    p.add_argument("--all", action="store_true", help="pending: also those loaded already")
    p.add_argument("--load-key", help="resolve: the unresolved load")
    p.add_argument("--outcome", choices=("credited", "not_credited"), help="resolve")
    p.add_argument("--reason", default="", help="resolve, correct: why (required)")
    p.add_argument("--terminal", help="correct: the terminal that wrote the record")
    p.add_argument("--seq", type=int, help="correct: the record's seq")
    p.set_defaults(func=lambda args: cmd_loads(args, admin_call))

    p = sub.add_parser("vouchers", help="top-up vouchers (他充): issue or list (admin API)")
    common(p)
    p.add_argument("action", choices=("issue", "list"))
    p.add_argument("--amount", type=int, help="issue: fen per voucher")
    p.add_argument("--count", type=int, default=1, help="issue: how many codes")
    p.set_defaults(func=lambda args: cmd_vouchers(args, admin_call))


def host_answer(response: httpx.Response | None, *ok: int) -> Any:
    """The JSON of an admin call's answer, or ``None`` once a link error (``response`` is
    ``None``: already reported) or a status outside ``ok`` has been reported."""
    if response is None:
        return None
    if response.status_code not in ok:
        err(f"cardhost: host answered {response.status_code}: {response.text[:1000]}")
        return None
    return response.json()


def cmd_loads(args: argparse.Namespace, admin_call: AdminCall) -> int:
    if args.action == "list":
        state = "unresolved" if args.unresolved else args.state
        query = f"?state={state}" if state else ""
        answer = host_answer(admin_call(args, "GET", f"/v1/loads{query}", None), 200)
        if answer is None:
            return 2
        for load in answer["loads"]:
            held = "money held" if load.get("unresolved") else ""
            out(
                f"{load['load_key']}\t{load['state']}\t{load['asn']}\t{load['amount']}\t"
                f"{load.get('terminal_id', '')}\t{load.get('payment', '')}\t{held}\t"
                f"{load['detail']}"
            )
        return 0
    if args.action == "pending":
        query = f"?card={args.card}" if args.card else ""
        if args.all:
            query += ("&" if query else "?") + "all=1"
        answer = host_answer(admin_call(args, "GET", f"/v1/admin/loads/credits{query}", None), 200)
        if answer is None:
            return 2
        for pending in answer["pending_loads"]:
            out(json.dumps(pending, ensure_ascii=False))
        return 0
    if args.action == "resolve":
        if not args.load_key or not args.outcome or not args.reason:
            raise ConfigurationError(
                "cardhost loads resolve needs --load-key, --outcome and --reason"
            )
        path = f"/v1/admin/loads/{args.load_key}/resolve"
        body = {"outcome": args.outcome, "reason": args.reason}
        answer = host_answer(admin_call(args, "POST", path, body), 200)
        if answer is None:
            return 2
        out(json.dumps(answer, ensure_ascii=False))
        return 0
    if args.action in ("unfinished", "correct"):
        return _fare_corrections(args, admin_call)
    if not args.card or args.amount is None:
        raise ConfigurationError("cardhost loads credit needs --card ASN and --amount FEN")
    body = {
        "card": args.card,
        "amount": args.amount,
        "source": args.source,
        "reference": args.reference,
    }
    answer = host_answer(admin_call(args, "POST", "/v1/admin/loads/credits", body), 201)
    if answer is None:
        return 2
    out(json.dumps(answer, ensure_ascii=False))
    return 0


def _fare_corrections(args: argparse.Namespace, admin_call: AdminCall) -> int:
    """``loads unfinished`` (one line per record: terminal, seq, card, fare kind, line, stop,
    the pending load that corrected it or ``-``) and ``loads correct``."""
    path = "/v1/admin/loads/fare-corrections"
    if args.action == "unfinished":
        answer = host_answer(admin_call(args, "GET", path, None), 200)
        if answer is None:
            return 2
        for trip in answer["unfinished_trips"]:
            out(
                f"{trip['terminal_id']}\t{trip['seq']}\t{trip.get('card_id')}\t"
                f"{trip.get('fare_kind')}\tline {trip.get('fare_line')} stop "
                f"{trip.get('fare_stop')}\t{trip.get('corrected') or '-'}"
            )
        return 0
    if not args.terminal or args.seq is None or args.amount is None or not args.reason:
        raise ConfigurationError(
            "cardhost loads correct needs --terminal, --seq, --amount FEN and --reason"
        )
    body = {
        "terminal_id": args.terminal,
        "seq": args.seq,
        "amount": args.amount,
        "reason": args.reason,
    }
    answer = host_answer(admin_call(args, "POST", path, body), 201)
    if answer is None:
        return 2
    out(json.dumps(answer, ensure_ascii=False))
    return 0


def cmd_vouchers(args: argparse.Namespace, admin_call: AdminCall) -> int:
    if args.action == "list":
        answer = host_answer(admin_call(args, "GET", "/v1/admin/vouchers", None), 200)
        if answer is None:
            return 2
        for voucher in answer["vouchers"]:
            used = f"redeemed by {voucher['load_key']}" if voucher["load_key"] else "open"
            out(f"{voucher['code']}\t{voucher['amount']}\t{used}")
        return 0
    if args.amount is None:
        raise ConfigurationError("cardhost vouchers issue needs --amount FEN")
    body = {"amount": args.amount, "count": args.count}
    answer = host_answer(admin_call(args, "POST", "/v1/admin/vouchers", body), 201)
    if answer is None:
        return 2
    for code in answer["codes"]:
        out(code)
    return 0
