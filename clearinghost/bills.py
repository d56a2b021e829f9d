"""The utility bill book (一帐通, issue 10): water, electricity, gas and heating bills an
operator loads from CSV, looked up by a kiosk by utility account number and paid from the card
as a purchase to the utility as merchant (category ``utility``: the agency commission of
:mod:`clearinghost.settlement`).

States: ``open`` → ``payment_pending`` (a kiosk started paying it; or its record came back
``unresolved``) → ``paid`` (its signed purchase record was ingested: only then). A kiosk whose
payment was refused (no money moved) releases the bill to ``open``. Pure: the CSV parser and
the bill's JSON view; storage is :class:`clearinghost.storage.Storage`.

CSV header ``bill_id,account,utility,period,amount,merchant_id``; ``amount`` in integer fen.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from agent.kiosk import ACCOUNT, BILL_ID
from agent.merchant import merchant_id_problem

UTILITIES = ("water", "electricity", "gas", "heating")
BILL_COLUMNS = ("bill_id", "account", "utility", "period", "amount", "merchant_id")
STATES = ("open", "payment_pending", "paid")
MAX_BILL_AMOUNT = 10_000_000  # fen: 100 000 yuan
MAX_BILLS = 100_000


class BillBookError(Exception):
    """A bill CSV refused whole; the message names every bad line."""


@dataclass(frozen=True, slots=True)
class Bill:
    bill_id: str
    account: str
    utility: str
    period: str
    amount: int
    merchant_id: str


def parse_bills(text: str) -> list[Bill]:
    """Every bill of the CSV, or :class:`BillBookError` naming every bad line (nothing is
    loaded from a file with one bad line)."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:  # e.g. a lone carriage return inside a field
        raise BillBookError(f"the bill book is not CSV: {exc}") from exc
    if not rows or tuple(c.strip() for c in rows[0]) != BILL_COLUMNS:
        raise BillBookError(f"line 1: the header must be {','.join(BILL_COLUMNS)}")
    problems: list[str] = []
    bills: list[Bill] = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(BILL_COLUMNS):
            problems.append(f"line {number}: {len(row)} columns, expected {len(BILL_COLUMNS)}")
            continue
        bill_id, account, utility, period, amount_text, merchant_id = (c.strip() for c in row)
        bad: list[str] = []
        if BILL_ID.fullmatch(bill_id) is None:
            bad.append(f"bill_id {bill_id!r} is not 1..41 of A-Z a-z 0-9 . _ -")
        elif bill_id in seen:
            bad.append(f"bill_id {bill_id!r} already on line {seen[bill_id]}")
        if ACCOUNT.fullmatch(account) is None:
            bad.append(f"account {account!r} is not 1..32 of A-Z a-z 0-9 -")
        if utility not in UTILITIES:
            bad.append(f"utility {utility!r} is not one of {', '.join(UTILITIES)}")
        if not period or len(period) > 32:
            bad.append("period must be 1..32 characters")
        amount = int(amount_text) if amount_text.isdigit() else -1
        if not 0 < amount <= MAX_BILL_AMOUNT:
            bad.append(f"amount {amount_text!r} is not an integer 1..{MAX_BILL_AMOUNT} fen")
        if (problem := merchant_id_problem(merchant_id)) is not None:
            bad.append(f"merchant_id {merchant_id!r}: {problem}")
        if bad:
            problems.append(f"line {number}: " + "; ".join(bad))
            continue
        seen[bill_id] = number
        bills.append(Bill(bill_id, account, utility, period, amount, merchant_id))
    if len(bills) > MAX_BILLS:
        problems.append(f"{len(bills)} bills: at most {MAX_BILLS} in one file")
    if problems:
        raise BillBookError("bill CSV refused, nothing loaded:\n" + "\n".join(problems))
    if not bills:
        raise BillBookError("bill CSV refused: no bills after the header")
    return bills


def bill_view(row: tuple[Any, ...]) -> dict[str, Any]:
    """The JSON form of a ``bills`` row (the columns of :data:`SELECT_BILL`)."""
    return {
        "bill_id": str(row[0]),
        "account": str(row[1]),
        "utility": str(row[2]),
        "period": str(row[3]),
        "amount": int(row[4]),
        "merchant_id": str(row[5]),
        "state": str(row[6]),
        "terminal_id": None if row[7] is None else str(row[7]),
        "seq": None if row[8] is None else int(row[8]),
        "card_id": None if row[9] is None else str(row[9]),
        "detail": str(row[10]),
    }


SELECT_BILL = (
    "SELECT bill_id, account, utility, period, amount, merchant_id, state, terminal_id, seq, "
    "card_id, detail FROM bills"
)
