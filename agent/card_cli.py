"""``cardagent card read``: a technician's look at a CPU purse card (issue 15).

Waits for a card on the profile's reader (or ``--reader-url``), reads it with
:func:`agent.products.cpu_inspect.inspect_card` (read-only: no SAM, nothing written) and prints
its public information, printed number, balances, transaction log and trip records.
:func:`card_summary` is the one line ``cardagent readers`` prints for the card in the
profile's reader (its printed number, dialect and serial).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any, TextIO

from agent.apdu import Command, Party, Response, parse_response
from agent.errors import AgentError, ReaderTimeout
from agent.products import cpu_purse
from agent.products.cpu_inspect import CardReport, profile_inspection
from agent.profile import PURSES, Profile, load_profile
from agent.readers.base import CardTechnology
from agent.wiring import open_card_reader

PURSE_NAMES = {value: name.upper() for name, value in PURSES.items()}
TRANSACTION_TYPES = {0x02: "load", 0x05: "ED purchase", 0x06: "purchase", 0x09: "compound"}


def register(sub: Any) -> None:
    """Add ``card read`` to ``cardagent``'s subcommands."""
    p = sub.add_parser("card", help="read a card for a technician (read-only)")
    csub = p.add_subparsers(required=True, metavar="ACTION")
    rp = csub.add_parser("read", help="print a card's information, balances, logs and trips")
    rp.add_argument("--profile", type=Path, required=True)
    rp.add_argument("--reader-url", help="override the profile's reader URL")
    rp.add_argument("--wait", type=float, default=10.0, help="seconds to wait for a card")
    rp.set_defaults(func=cmd_card_read)


def cmd_card_read(args: argparse.Namespace) -> int:
    """Exit 0 with the report, 1 when no CPU card came within ``--wait`` seconds."""
    profile = load_profile(args.profile)
    reader = open_card_reader(profile, args.reader_url)
    try:
        presence = reader.wait_for_card(args.wait)
        if presence is None:
            raise ReaderTimeout(f"{reader.name}: no card within {args.wait:g} s")
        if presence.technology is not CardTechnology.ISO_DEP:
            kind = presence.technology.value
            sys.stdout.write(f"{presence.uid.hex().upper()}: a {kind} card, not a CPU card\n")
            return 1

        def exchange(command: Command) -> Response:
            return parse_response(reader.transmit(command.to_bytes()), command, Party.CARD)

        report = cpu_purse.drive(profile_inspection(profile), exchange)
    finally:
        reader.close()
    print_report(report)
    return 0


def card_summary(profile: Profile, reader_url: str | None = None, wait: float = 1.0) -> str:
    """One line on the card in the profile's reader, for ``cardagent readers``: a CPU card's
    printed number, dialect and serial (read-only: SELECT and the public files, no SAM), an M1
    card's UID, or why the card could not be read (the error names who failed)."""
    reader = open_card_reader(profile, reader_url)
    try:
        presence = reader.wait_for_card(wait)
        if presence is None:
            return "no card"
        if presence.technology is not CardTechnology.ISO_DEP:
            return f"{presence.technology.value} card, UID {presence.uid.hex().upper()}"

        def exchange(command: Command) -> Response:
            return parse_response(reader.transmit(command.to_bytes()), command, Party.CARD)

        try:
            card = cpu_purse.drive(_public_information(profile), exchange)
        except AgentError as exc:
            return f"CPU card, UID {presence.uid.hex().upper()}: not read ({exc.party}: {exc})"
    finally:
        reader.close()
    return f"number {card.printed_number} (dialect {card.dialect}, serial {card.card_id})"


def _public_information(profile: Profile) -> cpu_purse.Step[cpu_purse.CpuCard]:
    """The first of the profile's applications the card carries, read by its dialect."""
    missing: list[str] = []
    for app in profile.applications:
        try:
            fci = yield from cpu_purse.select_application(app)
        except cpu_purse.ApplicationNotFound as exc:
            missing.append(str(exc))
            continue
        return (yield from cpu_purse.read_card(app, fci, profile.dialects))
    raise cpu_purse.ApplicationNotFound("; ".join(missing) or "no application in the profile")


def _money(fen: int) -> str:
    return f"{fen / 100:.2f}"


def _when(value: dt.datetime | None) -> str:
    return value.isoformat(sep=" ") if value else "-"


def print_report(report: CardReport, out: TextIO | None = None) -> None:
    card, dialect = report.card, report.dialect

    def line(text: str) -> None:
        (out or sys.stdout).write(text + "\n")

    where = f"AID {card.aid.hex().upper()}" if card.aid else "ADF FID 1001"
    line(f"card        {card.family.value} (dialect {dialect.name}), {where}")
    line(f"number      {card.printed_number} (serial {card.card_id}, ASN {card.asn.hex().upper()})")
    line(
        f"issuer      {card.issuer_id.hex().upper()}, city {card.city_code}; "
        f"blacklisted by printed number as issuer {card.issuer_code or '-'}"
    )
    line(f"valid       {card.start} .. {card.expiry}")
    extra = [f"card type {card.card_type}"] if card.card_type is not None else []
    if card.interop_flag is not None:
        extra.append(f"interop flag {card.interop_flag:04X}")
    if extra:
        line(f"management  {', '.join(extra)}")
    purse = PURSE_NAMES.get(card.purse, f"P2 {card.purse:02X}")
    text = f"balance     {_money(report.shown_balance)} shown; {purse} raw {card.balance}"
    if report.negative_purse is not None:
        text += f", negative purse (P1 {dialect.negative_purse_p1:02X}) {report.negative_purse}"
    if (dialect.balance_scale, dialect.balance_offset) != (1, 0):
        text += f", shown = raw x {dialect.balance_scale} - {dialect.balance_offset}"
    line(text)
    if not card.payment:
        line("payment     refused at a tap (dialect payment = false: not a transit purse)")
    line(f"transactions (EF18, newest first): {len(report.log)}")
    for entry in report.log:
        kind = TRANSACTION_TYPES.get(entry.transaction_type, "")
        line(
            f"  #{entry.counter:<5} {_when(entry.when):<19} {entry.transaction_type:02X} "
            f"{kind:<11} {_money(entry.amount):>8}  terminal {entry.terminal}"
        )
    layout = dialect.trips
    if layout is not None:
        line(f"trips (EF{layout.sfi:02X}, newest first): {len(report.trips)}")
        for trip in report.trips:
            line(
                f"  {_when(trip.when):<19} type {trip.record_type:02X} industry "
                f"{trip.industry:02X} line {trip.line} station {trip.station} vehicle "
                f"{trip.vehicle} {_money(trip.amount):>8} balance {_money(trip.balance)} "
                f"city {trip.city or '-'} institution {trip.institution or '-'} "
                f"terminal {trip.terminal}"
            )
    for problem in report.problems:
        line(f"not read    {problem}")
