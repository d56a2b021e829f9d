"""Merchant-alliance daily clearing (清分, issue 11): pure functions, no I/O.

Money is integer fen everywhere; fee rates are integer basis points (1 bp = 0.01 %).

Rounding rule: the fee (or, for utility bill collection, the agency commission) of one merchant
for one day is ``round_half_up(purchases × bp / 10000)``, computed on the day's sum (never per
record) in integer arithmetic: ``(purchases × bp + 5000) // 10000``. The merchant's net is
``purchases − fee − commission``, so a day's totals reconcile exactly:
``Σ purchases = Σ net + Σ fee + Σ commission``.

The day of a record is the calendar date of its own ``created_at`` in the city's time zone
(default Asia/Shanghai), never the day it arrived. A record that arrives after its day was
cleared makes the next clearing of that day a new *version*: the version's lines are the whole
day again, each with ``paid_before`` (the net of the previous version) and ``to_pay`` (net −
paid_before: the adjustment to pay now, which is the whole net in version 1).

Records of kind ``unresolved`` are listed apart (never paid, never charged) until an operator
resolves them (``paid``: settled as a purchase of its merchant on its own day, so the next
clearing of that day is a new version with the adjustment; ``void``: dropped);
``refund_request`` records are listed as credits owed to the card holder, per merchant, never
netted from the merchant's payout silently. A purchase without a merchant (a terminal with no
``[merchant]``) or of a merchant not in the register is listed apart as ``unassigned``.

Terminal binding: the host binds each terminal to one merchant (``merchant_terminals``, loaded
by an operator). A purchase or refund request naming a merchant that its terminal is not bound
to (a terminal of another shop, or one bound to none) is kept but listed apart as ``unbound``
and flagged as an anomaly: the host never pays a merchant for another terminal's records.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.merchant import (
    CATEGORIES,
    MERCHANT_ID_FIELD,
    category_problem,
    merchant_id_problem,
)
from agent.terminal_id import terminal_id_problem

BP_DENOMINATOR = 10_000
MAX_RATE_BP = 1_000  # 10 %: a rate above this is a typo, refused
DEFAULT_TIME_ZONE = "Asia/Shanghai"
UTILITY = "utility"
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2099, 12, 31)  # the days a clearing may name

# The city plan's ranges and the documented default (a point in each range).
PLAN_RANGES_BP: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "dining": (200, 250),  # dining, hotels, entertainment 2–2.5 %
        "department_store": (70, 100),  # department stores, supermarkets, chains 0.7–1 %
        "retail": (90, 120),  # retail, small goods, tobacco, convenience 0.9–1.2 %
        "tourism": (130, 170),  # tourism and crafts 1.3–1.7 %
        "other": (100, 100),  # other: about 1 %
        "utility": (200, 250),  # utility bill collection (agency commission) 2–2.5 %
    }
)
DEFAULT_RATES_BP: Mapping[str, int] = MappingProxyType(
    {
        "dining": 225,  # 2.25 %: the middle of 2–2.5 %
        "department_store": 85,  # 0.85 %
        "retail": 105,  # 1.05 %
        "tourism": 150,  # 1.5 %
        "other": 100,  # 1 %
        "utility": 225,  # 2.25 % agency commission
    }
)

CSV_COLUMNS = (
    "line",
    "merchant_id",
    "name",
    "category",
    "settlement_account",
    "count",
    "purchases",
    "rate_bp",
    "fee",
    "commission",
    "net",
    "paid_before",
    "to_pay",
    "terminal_id",
    "seq",
    "amount",
    "reference",
)

_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_ACCOUNT = re.compile(r"[0-9A-Za-z-]{4,40}")


class SettlementError(ValueError):
    """A clearing input that cannot be used, saying which and why."""


# --- arithmetic ---------------------------------------------------------------------------


def fee_fen(purchases: int, rate_bp: int) -> int:
    """``round_half_up(purchases × rate_bp / 10000)`` in integer arithmetic (purchases ≥ 0)."""
    if purchases < 0 or not 0 <= rate_bp <= BP_DENOMINATOR:
        raise SettlementError(f"fee of {purchases} fen at {rate_bp} bp is not defined")
    return (purchases * rate_bp + BP_DENOMINATOR // 2) // BP_DENOMINATOR


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """Rates in basis points per category (host configuration, validated whole)."""

    rates_bp: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_RATES_BP))

    def __post_init__(self) -> None:
        for category in CATEGORIES:
            if category not in self.rates_bp:
                raise SettlementError(f"fee schedule: no rate for category {category!r}")
        for category, rate in self.rates_bp.items():
            if category not in CATEGORIES:
                raise SettlementError(
                    f"fee schedule: unknown category {category!r} (known: {', '.join(CATEGORIES)})"
                )
            if isinstance(rate, bool) or not isinstance(rate, int) or not 0 <= rate <= MAX_RATE_BP:
                raise SettlementError(
                    f"fee schedule: rate of {category!r} must be an integer 0..{MAX_RATE_BP} "
                    f"basis points, got {rate!r}"
                )

    @classmethod
    def from_mapping(cls, raw: Any) -> FeeSchedule:
        """``{"rates_bp": {category: bp, ...}}``; a category left out keeps its default."""
        if not isinstance(raw, Mapping) or set(raw) - {"rates_bp"}:
            raise SettlementError('fee schedule: expected an object {"rates_bp": {...}}')
        given = raw.get("rates_bp", {})
        if not isinstance(given, Mapping):
            raise SettlementError("fee schedule: rates_bp must be an object")
        return cls({**DEFAULT_RATES_BP, **given})

    def rate(self, category: str) -> int:
        return self.rates_bp[category]


# --- days ---------------------------------------------------------------------------------


def city_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise SettlementError(f"unknown time zone {name!r}") from exc


def parse_day(text: str) -> date:
    """A business day ``YYYY-MM-DD``."""
    if not isinstance(text, str) or _DAY.fullmatch(text) is None:
        raise SettlementError(f"day must be YYYY-MM-DD, got {text!r}")
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise SettlementError(f"day {text!r} is not a date") from exc
    if not FIRST_DAY <= day <= LAST_DAY:
        raise SettlementError(f"day {text} is outside {FIRST_DAY}..{LAST_DAY}")
    return day


def _stamp(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def day_bounds(day: date, zone: ZoneInfo) -> tuple[str, str]:
    """``[start, end)`` of ``day`` in ``zone`` as record timestamps (UTC, ``…T…Z``): a record
    belongs to the day iff ``start <= created_at < end`` (the format sorts as text)."""
    start = datetime.combine(day, time(0), tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
    return _stamp(start), _stamp(end)


def business_day(created_at: str, zone: ZoneInfo) -> date:
    """The day a record belongs to: its own time in the city's zone."""
    moment = datetime.strptime(created_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return moment.astimezone(zone).date()


# --- the merchant register ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Merchant:
    merchant_id: str
    name: str
    category: str
    settlement_account: str


REGISTER_COLUMNS = ("merchant_id", "name", "category", "settlement_account")


def parse_register(text: str) -> list[Merchant]:
    """The register CSV (header ``merchant_id,name,category,settlement_account``). Every bad
    line is reported (``line N: …``) in one :class:`SettlementError`; nothing is half-loaded."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:  # e.g. a lone carriage return inside a field
        raise SettlementError(f"the register is not CSV: {exc}") from exc
    if not rows or [c.strip() for c in rows[0]] != list(REGISTER_COLUMNS):
        raise SettlementError(f"line 1: the header must be {','.join(REGISTER_COLUMNS)}")
    problems: list[str] = []
    merchants: list[Merchant] = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(REGISTER_COLUMNS):
            problems.append(f"line {number}: expected 4 fields, got {len(row)}")
            continue
        merchant_id, name, category, account = (c.strip() for c in row)
        if (problem := merchant_id_problem(merchant_id)) is not None:
            problems.append(f"line {number}: merchant_id {merchant_id!r} {problem}")
        elif merchant_id in seen:
            problems.append(
                f"line {number}: merchant_id {merchant_id!r} already on line {seen[merchant_id]}"
            )
        if not name or len(name) > 100:
            problems.append(f"line {number}: name must be 1..100 characters")
        if (problem := category_problem(category)) is not None:
            problems.append(f"line {number}: category {category!r} {problem}")
        if _ACCOUNT.fullmatch(account) is None:
            problems.append(
                f"line {number}: settlement_account {account!r} must be 4..40 of 0-9 A-Z a-z -"
            )
        seen.setdefault(merchant_id, number)
        merchants.append(Merchant(merchant_id, name, category, account))
    if problems:
        raise SettlementError("; ".join(problems))
    return merchants


BINDING_COLUMNS = ("terminal_id", "merchant_id")


def parse_bindings(text: str) -> list[tuple[str, str]]:
    """Terminal bindings CSV (header ``terminal_id,merchant_id``): every bad line is reported
    (``line N: …``) in one :class:`SettlementError`; a terminal may appear once."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise SettlementError(f"the bindings are not CSV: {exc}") from exc
    if not rows or [c.strip() for c in rows[0]] != list(BINDING_COLUMNS):
        raise SettlementError(f"line 1: the header must be {','.join(BINDING_COLUMNS)}")
    problems: list[str] = []
    pairs: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(BINDING_COLUMNS):
            problems.append(f"line {number}: expected 2 fields, got {len(row)}")
            continue
        terminal_id, merchant_id = (c.strip() for c in row)
        if (problem := terminal_id_problem(terminal_id)) is not None:
            problems.append(f"line {number}: {problem}")
        elif terminal_id in seen:
            problems.append(
                f"line {number}: terminal_id {terminal_id!r} already on line {seen[terminal_id]}"
            )
        if (problem := merchant_id_problem(merchant_id)) is not None:
            problems.append(f"line {number}: merchant_id {merchant_id!r} {problem}")
        seen.setdefault(terminal_id, number)
        pairs.append((terminal_id, merchant_id))
    if problems:
        raise SettlementError("; ".join(problems))
    return pairs


# --- one day's settlement ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DayRecord:
    """What clearing needs of a stored record."""

    terminal_id: str
    seq: int
    created_at: str
    kind: str
    amount: int
    fields: Mapping[str, Any]
    resolution: str = ""  # of an unresolved record: "" (open), "paid" or "void"


RESOLUTIONS = ("paid", "void")


@dataclass(frozen=True, slots=True)
class MerchantLine:
    merchant: Merchant
    count: int
    purchases: int
    rate_bp: int
    fee: int
    commission: int
    net: int
    paid_before: int
    to_pay: int


@dataclass(frozen=True, slots=True)
class ApartLine:
    """A record listed apart: ``unresolved``, ``unassigned``, ``credit_owed`` or ``unbound``
    (a record naming a merchant its terminal is not bound to at the host: kept, flagged as an
    anomaly, never paid to that merchant)."""

    line: str
    terminal_id: str
    seq: int
    amount: int
    merchant_id: str
    reference: str


@dataclass(frozen=True, slots=True)
class Settlement:
    day: date
    version: int
    merchants: tuple[MerchantLine, ...]
    apart: tuple[ApartLine, ...]

    @property
    def purchases(self) -> int:
        return sum(m.purchases for m in self.merchants)

    @property
    def fees(self) -> int:
        return sum(m.fee for m in self.merchants)

    @property
    def commissions(self) -> int:
        return sum(m.commission for m in self.merchants)

    @property
    def net(self) -> int:
        return sum(m.net for m in self.merchants)

    def totals(self) -> dict[str, int]:
        return {
            "purchases": self.purchases,
            "fees": self.fees,
            "commissions": self.commissions,
            "net": self.net,
            "to_pay": sum(m.to_pay for m in self.merchants),
            "credits_owed": sum(a.amount for a in self.apart if a.line == "credit_owed"),
            "unresolved": sum(a.amount for a in self.apart if a.line == "unresolved"),
            "unassigned": sum(a.amount for a in self.apart if a.line == "unassigned"),
            "unbound": sum(a.amount for a in self.apart if a.line == "unbound"),
        }


def _text(fields: Mapping[str, Any], name: str) -> str:
    value = fields.get(name)
    return value if isinstance(value, str) else ""


PAYABLE_KINDS = ("purchase", "unresolved", "refund_request")


@dataclass(slots=True)
class DayTally:
    """One day's records reduced to what a settlement needs: per merchant ``[count, sum]`` of
    the payable purchases, and the records listed apart. Memory is one entry per merchant plus
    one per record listed apart, whatever the number of purchases (the host sums those in SQL
    and hands :meth:`add` only the records that may not be payable)."""

    sums: dict[str, list[int]] = field(default_factory=dict)
    apart: list[ApartLine] = field(default_factory=list)

    def pay(self, merchant_id: str, count: int, amount: int) -> None:
        entry = self.sums.setdefault(merchant_id, [0, 0])
        entry[0] += count
        entry[1] += amount

    def add(self, rec: DayRecord, register: Container[str], bindings: Mapping[str, str]) -> None:
        """Classify one record of the day (the day is the caller's to check)."""
        merchant_id = _text(rec.fields, MERCHANT_ID_FIELD)
        reference = _text(rec.fields, "pos_order")
        kind = rec.kind
        if kind == "unresolved" and rec.resolution == "void":
            return  # resolved: the card was never debited
        if kind == "unresolved" and rec.resolution == "paid":
            kind = "purchase"  # resolved: the debit happened, the merchant is paid for it
        bound = bindings.get(rec.terminal_id, "")

        def apart(line: str, ref: str) -> None:
            self.apart.append(
                ApartLine(line, rec.terminal_id, rec.seq, rec.amount, merchant_id, ref)
            )

        if kind == "unresolved":
            apart("unresolved", "")
        elif kind == "refund_request":
            refund = _text(rec.fields, "refund_id")
            ref = f"{reference}/{refund}" if refund else reference
            if merchant_id and merchant_id != bound:
                apart("unbound", f"{ref};bound={bound or '-'}")
            else:
                apart("credit_owed", ref)
        elif kind == "purchase":
            if merchant_id not in register:
                apart("unassigned", reference)
            elif merchant_id != bound:
                apart("unbound", f"{reference};bound={bound or '-'}")
            else:
                self.pay(merchant_id, 1, rec.amount)


def settle_day(
    day: date,
    records: Iterable[DayRecord],
    register: Mapping[str, Merchant],
    fees: FeeSchedule,
    zone: ZoneInfo,
    *,
    bindings: Mapping[str, str],
    version: int = 1,
    paid_before: Mapping[str, int] | None = None,
) -> Settlement:
    """The settlement of ``day`` from its records (the reference the host's SQL path must
    agree with): records of other days are ignored (by their own time).

    The merchant's category (hence its rate) is the register's, not the record's: a terminal
    cannot choose its own fee. ``bindings`` maps each terminal id to the merchant it is bound
    to at the host: a record naming another merchant is listed apart as ``unbound``, never
    paid. ``paid_before`` is each merchant's net in the previous version.
    """
    tally = DayTally()
    for rec in records:
        if business_day(rec.created_at, zone) == day:
            tally.add(rec, register, bindings)
    return settle_tally(day, tally, register, fees, version=version, paid_before=paid_before)


def settle_tally(
    day: date,
    tally: DayTally,
    register: Mapping[str, Merchant],
    fees: FeeSchedule,
    *,
    version: int = 1,
    paid_before: Mapping[str, int] | None = None,
) -> Settlement:
    """The merchant lines of a day's :class:`DayTally` (fees on each merchant's day sum)."""
    sums = tally.sums
    before = paid_before or {}
    lines = []
    for merchant_id in sorted(set(sums) | set(before)):
        merchant = register.get(merchant_id)
        if merchant is None:  # paid before, gone from the register since: still owed its line
            merchant = Merchant(merchant_id, "(not in register)", "other", "")
        count, purchases = sums.get(merchant_id, [0, 0])
        rate = fees.rate(merchant.category)
        charge = fee_fen(purchases, rate)
        fee, commission = (0, charge) if merchant.category == UTILITY else (charge, 0)
        net = purchases - fee - commission
        paid = before.get(merchant_id, 0)
        lines.append(
            MerchantLine(merchant, count, purchases, rate, fee, commission, net, paid, net - paid)
        )
    apart = sorted(tally.apart, key=lambda a: (a.line, a.terminal_id, a.seq))
    return Settlement(day, version, tuple(lines), tuple(apart))


# --- the settlement file --------------------------------------------------------------------


SIGNATURE_DOMAIN = b"CARDHOST-SETTLEMENT-V1\n"


def settlement_csv(settlement: Settlement) -> bytes:
    """The day's file: a header, one ``merchant`` line per merchant, then the records listed
    apart (``unresolved``, ``unassigned``, ``credit_owed``), then a ``total`` line. UTF-8."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for m in settlement.merchants:
        writer.writerow(
            [
                "merchant",
                m.merchant.merchant_id,
                m.merchant.name,
                m.merchant.category,
                m.merchant.settlement_account,
                m.count,
                m.purchases,
                m.rate_bp,
                m.fee,
                m.commission,
                m.net,
                m.paid_before,
                m.to_pay,
                "",
                "",
                "",
                "",
            ]
        )
    for a in settlement.apart:
        row: list[Any] = [a.line, a.merchant_id] + [""] * 11
        writer.writerow([*row, a.terminal_id, a.seq, a.amount, a.reference])
    t = settlement.totals()
    writer.writerow(
        [
            "total",
            f"{settlement.day.isoformat()} v{settlement.version}",
            "",
            "",
            "",
            sum(m.count for m in settlement.merchants),
            t["purchases"],
            "",
            t["fees"],
            t["commissions"],
            t["net"],
            sum(m.paid_before for m in settlement.merchants),
            t["to_pay"],
            "",
            "",
            "",
            "",
        ]
    )
    return out.getvalue().encode("utf-8")


def file_digest(content: bytes) -> bytes:
    """SHA-256 of the settlement file; the host signs ``SIGNATURE_DOMAIN + digest``."""
    return hashlib.sha256(content).digest()


def signed_message(content: bytes) -> bytes:
    return SIGNATURE_DOMAIN + file_digest(content)


def settlement_view(settlement: Settlement) -> dict[str, Any]:
    """The JSON answer of the clearing routes (the same figures as the file)."""
    return {
        "day": settlement.day.isoformat(),
        "version": settlement.version,
        "totals": settlement.totals(),
        "merchants": [
            {
                "merchant_id": m.merchant.merchant_id,
                "name": m.merchant.name,
                "category": m.merchant.category,
                "settlement_account": m.merchant.settlement_account,
                "count": m.count,
                "purchases": m.purchases,
                "rate_bp": m.rate_bp,
                "fee": m.fee,
                "commission": m.commission,
                "net": m.net,
                "paid_before": m.paid_before,
                "to_pay": m.to_pay,
            }
            for m in settlement.merchants
        ],
        "apart": [
            {
                "line": a.line,
                "terminal_id": a.terminal_id,
                "seq": a.seq,
                "amount": a.amount,
                "merchant_id": a.merchant_id,
                "reference": a.reference,
            }
            for a in settlement.apart
        ],
    }


def nets_of(lines: Sequence[MerchantLine]) -> dict[str, int]:
    return {m.merchant.merchant_id: m.net for m in lines}
