"""The fare policy of a signed parameter set (``fare_policy`` in the payload), as data.

One validator, :func:`parse_fare_policy`, is used by the clearing host at publication
(``clearinghost.server.params_problem`` through ``sync.params.check_payload``), by the sync
daemon before it stores a set, and by the agent when it applies one: a policy that one of them
refuses, all of them refuse. Every error names the field (``fare_policy.lines.1.stops[2]``).

Shape (money in integer fen, distances in metres, times in seconds)::

    {
      "mode": "flat" | "section" | "distance",
      "flat_fare": 200,                    # mode flat: the price of every trip
      "max_fare": 1000,                    # no trip costs more; the boarding pre-authorisation
      "bands": [                           # mode section: {"from": 1, "to": 4, "price": 200}
                                           # (sections travelled, inclusive, contiguous from 1)
                                           # mode distance: {"over_m": 0, "up_to_m": 6000,
                                           # "price": 300} (contiguous from 0, (over, up_to])
      ],
      "beyond": {"every": 20000, "add": 100},   # past the last band: + add per unit started
      "lines": {"1": {"mode": "bus", "stops": [{"id": 1, "at_m": 0, "section": 1}, ...]}},
      "card_types": {"05": {"percent": 50}, "06": {"free": true}},   # EF15/EF17 card type, hex
      "transfer": {"window_s": 7200, "discount": 100, "between": "lines" | "modes"},
      "daily_cap": 1500,                   # fen a card pays in one day at most
      "monthly_cap": 20000,                # fen a card pays in one calendar month at most
      "time_zone": "Asia/Shanghai",        # the city's zone: where a month begins (IANA name)
      "anti_passback_s": 600,
      "entry_exit": {"boarding_debit": "max" | "min", "max_trip_s": 14400,
                     "unfinished": "max_fare" | "penalty" | "host", "penalty": 500,
                     "entry_record_type": 3, "exit_record_type": 4}
    }

The record types default to the T-Union EF1E trip record's own codes (byte 0, the record's
main type): 03 entry (进站 / boarding), 04 exit (出站 / alighting), 06 a single tap (单次,
``agent.profile.TUNION_EF1E.record_type``). Source: the T-Union Master reader for the Flipper
Zero, ``applications/external/t_union_master/src/protocol/t_union_msg.h`` ("主类型 3:进站
4:出站 6:单次") and ``src/view_modules/app_elements.c`` (the entry/exit arrows drawn for
types 03 / 04), repository tkerby/flipperzero-firmware-wPlugins, commits
5afa037621267281d491325d7cf43bafe6ae8457 and 0bc372cda19d9cef5a9452b13c61e70cd21d6368.
JT/T 978 itself was not available to check; a city whose terminals write other codes sets
them in the policy.

The caps' accumulators are the terminal's own purchase records for the card (the daily cap
since local midnight, the monthly cap since the first of the month at 00:00 in ``time_zone``;
``agent.tap.context.TapContext``): none of the card families priced here gives this system a
field to keep a running total in (the T-Union EF1E / EF1A trip records, the CJ/T 166 CAPP
record and the M1 trip records carry one trip each, no sum), so a cap is per terminal: a card
that rides several validators in a month can pay up to the cap at each. The sync daemon keeps
the records of the cap's period in the store while such a policy is in force
(:func:`accumulator_since`), so compaction never empties the accumulator.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_FEN = 1_000_000  # 10 000 yuan: no fare, cap or penalty is above this
DEFAULT_TIME_ZONE = "Asia/Shanghai"  # China keeps one zone (UTC+8); a policy may name another
MAX_DAYS_AHEAD = 400  # a set effective further than this after its issue is refused
PUBLICATION_GRACE_S = 3600  # a fare_policy may not take effect earlier than this before publication
UNFINISHED = ("max_fare", "penalty", "host")
ENTRY_RECORD_TYPE = 0x03  # T-Union EF1E main type 03: 进站 (entry / boarding)
EXIT_RECORD_TYPE = 0x04  # T-Union EF1E main type 04: 出站 (exit / alighting)
SINGLE_RECORD_TYPE = 0x06  # T-Union EF1E main type 06: 单次 (a single-tap trip)


class NoFare(ValueError):
    """No price for this trip (a stop not on the line, a distance past the table)."""


class FarePolicyError(ValueError):
    """A fare policy the host, the daemon and the agent refuse; the message names the field."""


@dataclass(frozen=True, slots=True)
class Band:
    low: int  # exclusive for distance (over_m), inclusive for sections (from)
    high: int  # inclusive
    price: int


@dataclass(frozen=True, slots=True)
class Beyond:
    every: int
    add: int


@dataclass(frozen=True, slots=True)
class Stop:
    id: int
    at_m: int
    section: int


@dataclass(frozen=True, slots=True)
class Line:
    id: int
    mode: str
    stops: tuple[Stop, ...]

    def stop(self, stop_id: int) -> Stop | None:
        return next((s for s in self.stops if s.id == stop_id), None)


@dataclass(frozen=True, slots=True)
class Discount:
    percent: int  # what the rider pays, 0..100 (0 = free)


@dataclass(frozen=True, slots=True)
class Transfer:
    window_s: int
    discount: int
    between: str  # "lines" or "modes"


@dataclass(frozen=True, slots=True)
class EntryExit:
    boarding_debit: str = "max"
    max_trip_s: int = 4 * 3600
    unfinished: str = "max_fare"
    penalty: int = 0
    # T-Union EF1E byte 0: 03 entry (进站), 04 exit (出站); sources in the module docstring.
    entry_record_type: int = ENTRY_RECORD_TYPE
    exit_record_type: int = EXIT_RECORD_TYPE


@dataclass(frozen=True, slots=True)
class FarePolicy:
    mode: str
    max_fare: int
    flat_fare: int = 0
    bands: tuple[Band, ...] = ()
    beyond: Beyond | None = None
    lines: Mapping[int, Line] = field(default_factory=dict)
    card_types: Mapping[int, Discount] = field(default_factory=dict)
    transfer: Transfer | None = None
    daily_cap: int | None = None
    anti_passback_s: int = 0
    entry_exit: EntryExit | None = None
    monthly_cap: int | None = None  # fen in one calendar month of ``time_zone``
    time_zone: str = DEFAULT_TIME_ZONE


def _int(obj: Mapping[str, Any], key: str, where: str, *, low: int = 0, high: int = MAX_FEN) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FarePolicyError(f"{where}.{key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise FarePolicyError(f"{where}.{key} must be in {low}..{high}, got {value}")
    return value


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FarePolicyError(f"{where} must be an object")
    return value


def _known(obj: Mapping[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(set(obj) - keys)
    if unknown:
        raise FarePolicyError(f"{where} has unknown field(s) {', '.join(unknown)}")


def _bands(raw: object, mode: str) -> tuple[Band, ...]:
    where = "fare_policy.bands"
    if not isinstance(raw, list) or not raw:
        raise FarePolicyError(f"{where} must be a non-empty list for mode {mode}")
    low_key, high_key = ("over_m", "up_to_m") if mode == "distance" else ("from", "to")
    expected = 0 if mode == "distance" else 1
    big = 10_000_000 if mode == "distance" else 10_000
    bands: list[Band] = []
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        band = _obj(item, here)
        _known(band, {low_key, high_key, "price"}, here)
        low = _int(band, low_key, here, high=big)
        high = _int(band, high_key, here, high=big)
        price = _int(band, "price", here)
        if low < expected:
            raise FarePolicyError(f"{here} overlaps the band before it ({low_key} {low})")
        if low > expected:
            raise FarePolicyError(f"{here} leaves a gap ({low_key} {low}, expected {expected})")
        if (high <= low) if mode == "distance" else (high < low):
            raise FarePolicyError(f"{here} is empty ({low_key} {low}, {high_key} {high})")
        if bands and price < bands[-1].price:
            raise FarePolicyError(f"{here} is cheaper than the shorter band before it")
        bands.append(Band(low, high, price))
        expected = high if mode == "distance" else high + 1
    return tuple(bands)


def _lines(raw: object) -> dict[int, Line]:
    lines: dict[int, Line] = {}
    for key, item in _obj(raw, "fare_policy.lines").items():
        where = f"fare_policy.lines.{key}"
        if not (key.isascii() and key.isdigit()) or int(key) > 0xFFFFFF:
            raise FarePolicyError(f"{where}: a line id is a decimal number up to 16777215")
        line = _obj(item, where)
        _known(line, {"mode", "stops"}, where)
        mode = line.get("mode", "bus")
        if mode not in ("bus", "metro", "tram", "ferry"):
            raise FarePolicyError(f"{where}.mode must be bus, metro, tram or ferry, got {mode!r}")
        stops_raw = line.get("stops")
        if not isinstance(stops_raw, list) or not stops_raw:
            raise FarePolicyError(f"{where}.stops must be a non-empty list")
        stops: list[Stop] = []
        for i, s in enumerate(stops_raw):
            here = f"{where}.stops[{i}]"
            stop = _obj(s, here)
            _known(stop, {"id", "at_m", "section"}, here)
            made = Stop(
                _int(stop, "id", here, high=0xFFFF),
                _int(stop, "at_m", here, high=10_000_000) if "at_m" in stop else 0,
                _int(stop, "section", here, low=1, high=10_000) if "section" in stop else 1,
            )
            if stops and made.id in {x.id for x in stops}:
                raise FarePolicyError(f"{here}: stop id {made.id} twice on the line")
            if stops and (made.at_m < stops[-1].at_m or made.section < stops[-1].section):
                raise FarePolicyError(f"{here}: distances and sections must not go backwards")
            stops.append(made)
        lines[int(key)] = Line(int(key), str(mode), tuple(stops))
    return lines


def parse_fare_policy(raw: object) -> FarePolicy:
    """The policy of a payload's ``fare_policy``. Raises :class:`FarePolicyError`."""
    obj = _obj(raw, "fare_policy")
    _known(
        obj,
        {
            "mode", "flat_fare", "max_fare", "bands", "beyond", "lines", "card_types",
            "transfer", "daily_cap", "anti_passback_s", "entry_exit", "currency",
            "monthly_cap", "time_zone",
        },
        "fare_policy",
    )  # fmt: skip
    if obj.get("currency", "CNY") != "CNY":
        raise FarePolicyError("fare_policy.currency must be CNY (amounts in fen)")
    mode = obj.get("mode")
    if mode not in ("flat", "section", "distance"):
        raise FarePolicyError(f"fare_policy.mode must be flat, section or distance, got {mode!r}")
    max_fare = _int(obj, "max_fare", "fare_policy")
    flat = _int(obj, "flat_fare", "fare_policy") if mode == "flat" else 0
    bands = _bands(obj.get("bands"), mode) if mode != "flat" else ()
    beyond = None
    if "beyond" in obj:
        b = _obj(obj["beyond"], "fare_policy.beyond")
        _known(b, {"every", "add"}, "fare_policy.beyond")
        beyond = Beyond(
            _int(b, "every", "fare_policy.beyond", low=1, high=10_000_000),
            _int(b, "add", "fare_policy.beyond"),
        )
    lines = _lines(obj.get("lines", {}))
    if mode != "flat" and not lines:
        raise FarePolicyError(f"fare_policy.lines must describe the stops for mode {mode}")
    card_types: dict[int, Discount] = {}
    for key, item in _obj(obj.get("card_types", {}), "fare_policy.card_types").items():
        where = f"fare_policy.card_types.{key}"
        hex_digits = "0123456789abcdefABCDEF"
        card_type = int(key, 16) if len(key) == 2 and all(c in hex_digits for c in key) else -1
        if card_type < 0:
            raise FarePolicyError(f"{where}: a card type is two hex digits")
        d = _obj(item, where)
        _known(d, {"percent", "free"}, where)
        if d.get("free") is True and "percent" not in d:
            card_types[card_type] = Discount(0)
        elif "free" not in d:
            card_types[card_type] = Discount(_int(d, "percent", where, high=100))
        else:
            raise FarePolicyError(f"{where}: either free: true or percent, not both")
    transfer = None
    if "transfer" in obj:
        t = _obj(obj["transfer"], "fare_policy.transfer")
        _known(t, {"window_s", "discount", "between"}, "fare_policy.transfer")
        between = t.get("between", "lines")
        if between not in ("lines", "modes"):
            raise FarePolicyError("fare_policy.transfer.between must be lines or modes")
        transfer = Transfer(
            _int(t, "window_s", "fare_policy.transfer", low=1, high=86_400),
            _int(t, "discount", "fare_policy.transfer"),
            str(between),
        )
    daily_cap = _int(obj, "daily_cap", "fare_policy") if "daily_cap" in obj else None
    monthly_cap = _int(obj, "monthly_cap", "fare_policy") if "monthly_cap" in obj else None
    time_zone = _time_zone(obj.get("time_zone", DEFAULT_TIME_ZONE))
    passback = (
        _int(obj, "anti_passback_s", "fare_policy", high=86_400) if "anti_passback_s" in obj else 0
    )
    entry_exit = None
    if "entry_exit" in obj:
        where = "fare_policy.entry_exit"
        e = _obj(obj["entry_exit"], where)
        _known(
            e,
            {"boarding_debit", "max_trip_s", "unfinished", "penalty", "entry_record_type",
             "exit_record_type"},
            where,
        )  # fmt: skip
        if e.get("boarding_debit", "max") not in ("max", "min"):
            raise FarePolicyError(f"{where}.boarding_debit must be max or min")
        if e.get("unfinished", "max_fare") not in UNFINISHED:
            raise FarePolicyError(f"{where}.unfinished must be one of {', '.join(UNFINISHED)}")
        entry_exit = EntryExit(
            boarding_debit=str(e.get("boarding_debit", "max")),
            max_trip_s=_int(e, "max_trip_s", where, low=60, high=86_400)
            if "max_trip_s" in e
            else 4 * 3600,
            unfinished=str(e.get("unfinished", "max_fare")),
            penalty=_int(e, "penalty", where) if "penalty" in e else 0,
            entry_record_type=_int(e, "entry_record_type", where, high=255)
            if "entry_record_type" in e
            else ENTRY_RECORD_TYPE,
            exit_record_type=_int(e, "exit_record_type", where, high=255)
            if "exit_record_type" in e
            else EXIT_RECORD_TYPE,
        )
        if entry_exit.entry_record_type == entry_exit.exit_record_type:
            raise FarePolicyError(f"{where}: entry and exit record types must differ")
        if SINGLE_RECORD_TYPE in (entry_exit.entry_record_type, entry_exit.exit_record_type):
            raise FarePolicyError(
                f"{where}: record type {SINGLE_RECORD_TYPE:02X} is the single-tap trip record "
                "(T-Union EF1E 单次); boarding and alighting need their own types"
            )
        if entry_exit.unfinished == "penalty" and entry_exit.penalty > max_fare:
            raise FarePolicyError(f"{where}.penalty is above max_fare")
        if mode == "flat":
            raise FarePolicyError(f"{where} needs a section or distance table, not mode flat")
    policy = FarePolicy(
        mode=str(mode),
        max_fare=max_fare,
        flat_fare=flat,
        bands=bands,
        beyond=beyond,
        lines=lines,
        card_types=card_types,
        transfer=transfer,
        daily_cap=daily_cap,
        anti_passback_s=passback,
        entry_exit=entry_exit,
        monthly_cap=monthly_cap,
        time_zone=time_zone,
    )
    _check_coverage(policy)
    return policy


def _time_zone(value: object) -> str:
    """An IANA time zone name this system's tz database knows (``Asia/Shanghai``)."""
    where = "fare_policy.time_zone"
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isprintable():
        raise FarePolicyError(f"{where} must be an IANA time zone name, got {value!r}")
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise FarePolicyError(f"{where}: unknown time zone {value!r}") from None
    return value


def month_start(policy: FarePolicy, now: dt.datetime) -> dt.datetime:
    """The first instant of ``now``'s calendar month in the policy's time zone (aware): the
    monthly cap's accumulator counts from here. A naive ``now`` is taken as local time."""
    local = now.astimezone(zoneinfo.ZoneInfo(policy.time_zone))
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def accumulator_since(policy: FarePolicy, now: dt.datetime) -> dt.datetime | None:
    """The oldest record a cap of the policy counts (aware), ``None`` without a cap: what the
    store must keep (the sync daemon compacts nothing newer). The daily cap counts from local
    midnight of ``now`` (its own zone), the monthly cap from :func:`month_start`."""
    starts: list[dt.datetime] = []
    if policy.daily_cap is not None:
        local = now.astimezone()
        starts.append(local.replace(hour=0, minute=0, second=0, microsecond=0))
    if policy.monthly_cap is not None:
        starts.append(month_start(policy, now))
    return min(starts) if starts else None


def band_price(policy: FarePolicy, value: int) -> int:
    """The price for ``value`` sections travelled or metres, from the bands and ``beyond``."""
    for band in policy.bands:
        if value <= band.high:
            return band.price
    last = policy.bands[-1]
    if policy.beyond is None:
        raise NoFare(f"{value} is past the table (last band up to {last.high}) and no 'beyond'")
    units = -(-(value - last.high) // policy.beyond.every)  # every unit started
    return last.price + units * policy.beyond.add


def table_price(policy: FarePolicy, line: Line, origin: Stop, destination: Stop) -> int:
    """The price of a trip between two stops of a line, as the table says."""
    if policy.mode == "flat":
        return policy.flat_fare
    if policy.mode == "section":
        return band_price(policy, abs(destination.section - origin.section) + 1)
    return band_price(policy, abs(destination.at_m - origin.at_m))


def _check_coverage(policy: FarePolicy) -> None:
    """Every trip on every line has a price in the table, none above ``max_fare``."""
    if policy.mode == "flat" and policy.flat_fare > policy.max_fare:
        raise FarePolicyError("fare_policy.flat_fare is above max_fare")
    for line in policy.lines.values():
        first, last = line.stops[0], line.stops[-1]
        try:
            price = table_price(policy, line, first, last)
        except NoFare as exc:
            raise FarePolicyError(f"fare_policy.lines.{line.id}: {exc}") from None
        if price > policy.max_fare:
            raise FarePolicyError(
                f"fare_policy.lines.{line.id}: end to end costs {price}, above max_fare "
                f"{policy.max_fare}"
            )


def check_effective_window(payload: Mapping[str, Any]) -> None:
    """Part of every check: a set may not take effect more than :data:`MAX_DAYS_AHEAD` days
    after it was issued (a typo in the year)."""
    effective, issued = payload.get("effective_from"), payload.get("issued_at")
    if (
        isinstance(effective, int)
        and isinstance(issued, int)
        and effective > issued + MAX_DAYS_AHEAD * 86_400
    ):
        raise FarePolicyError(
            f"effective_from {effective} is more than {MAX_DAYS_AHEAD} days after "
            f"issued_at {issued}"
        )


def publication_problem(payload: Mapping[str, Any], now: int) -> str | None:
    """At publication only (a re-issue of a set later legitimately carries an old
    ``effective_from``): a fare policy may not take effect in the past. ``effective_from``
    0 (or absent) means 'as soon as terminals have it'."""
    effective = payload.get("effective_from", 0)
    if (
        "fare_policy" in payload
        and isinstance(effective, int)
        and 0 < effective < now - PUBLICATION_GRACE_S
    ):
        return (
            f"effective_from {effective} is in the past ({now - effective} s ago): "
            "a fare table would apply retroactively; use 0 for 'now'"
        )
    return None
