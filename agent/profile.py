"""Firmware profiles: everything city-specific, as validated data.

A profile is a TOML file (see ``firmware_profiles/``). Facts that the specs mark below H are
profile options, never constants. Loading validates every field and raises
:class:`ConfigurationError` naming the file and the field at fault.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import sys
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigurationError
from agent.merchant import category_problem, merchant_id_problem
from agent.products.m1_layout import M1Layout
from agent.products.trip_layout import (  # re-exported: their home before issue 13
    CJT166_CAPP,
    STANDARD_TRIPS,
    TUNION_EF1E,
    FieldEncoding,
    TimeEncoding,
    TripLayout,
    check_trip_layout,
)
from agent.readers.serial_module import Framing
from agent.sam.keys import KeySet

# The trip layouts moved to agent.products.trip_layout (issue 13); importers of this module keep
# finding them here.
__all__ = [
    "CJT166_CAPP",
    "STANDARD_TRIPS",
    "TUNION_EF1E",
    "FieldEncoding",
    "TimeEncoding",
    "TripLayout",
    "check_trip_layout",
]

E = TypeVar("E", bound=enum.Enum)

MAX_DOUBLE_TAP_WINDOW_S = 3600.0  # an hour; the window is a few seconds in practice
MAX_RECOVERY_WINDOW_S = 30 * 86400.0  # a torn debit waits at most 30 days for its card
MAX_BAUDRATE = 4_000_000  # the fastest USB-UART reader modules


class ProfileKind(enum.Enum):
    TEST = "test"
    PRODUCTION = "production"


class Family(enum.Enum):
    """CPU purse card families (cpu-purse.md §2.1, §9)."""

    TUNION = "tunion"  # JT/T 978 交通联合, AID A000000632010105
    CJT166 = "cjt166"  # CJ/T 166 城市一卡通互联互通, AID A00000000386980701
    LEGACY_1001 = "legacy1001"  # city cards selected by FID 1001


class Selection(enum.Enum):
    PPSE = "ppse"  # 2PAY.SYS.DDF01 directory, then the AID
    AID = "aid"
    FID = "fid"


class Flow(enum.Enum):
    SIMPLE = "simple"  # purchase, transaction type 06
    COMPOUND = "compound"  # CAPP purchase, type 09, with UPDATE CAPP DATA CACHE

    @property
    def transaction_type(self) -> int:
        return 0x09 if self is Flow.COMPOUND else 0x06


DEFAULT_AIDS = {
    Family.TUNION: bytes.fromhex("A000000632010105"),
    Family.CJT166: bytes.fromhex("A00000000386980701"),
    Family.LEGACY_1001: b"",
}


@dataclass(frozen=True, slots=True)
class ApplicationProfile:
    family: Family
    select: Selection
    flow: Flow
    aid: bytes
    ppse_label: str = "MOT_T_EP"
    ef17_length: int = 0x3C  # T-Union EF17 read length (S3 60 bytes; S9 reads 11)
    ef1e_industry: int = 0x02  # bus (cpu-purse.md §2.3 EF1E byte 9)


class Management(enum.Enum):
    """Where a card keeps its T-Union management data (country, province, city, interop flag,
    card catalogue: cpu-purse.md §2.3 EF17 layout)."""

    NONE = "none"  # no management data: the city comes from the info file
    EF17 = "ef17"  # READ BINARY EF17 (SFI 0x17), JT/T 978
    FCI_DF11 = "fci-df11"  # the same bytes in tag DF11 of the SELECT answer (Lingnan Pass T-Union)


class NumberEncoding(enum.Enum):
    """How the printed card number is written in the card's bytes."""

    HEX = "hex"  # the bytes' hex digits (BCD numbers: T-Union, Beijing, Lingnan Pass)
    DECIMAL_BE = "decimal-be"  # an unsigned big-endian integer in decimal (Shanghai CJ/T 166)
    DECIMAL_LE = "decimal-le"  # an unsigned little-endian integer in decimal (Shenzhen Tong)


class CheckDigit(enum.Enum):
    NONE = "none"
    # One more digit making the digit sum a multiple of 10, printed in parentheses
    # (Metrodroid NewShenzhenTransitData.formatSerial).
    DIGIT_SUM_10 = "digit-sum-10"


PURSES = {"ep": 0x02, "ed": 0x01}  # GET BALANCE / INITIALIZE P2 (§3.1, §3.7): 02 EP, 01 ED


@dataclass(frozen=True, slots=True)
class PrintedNumber:
    """Where the number printed on the card is (issue 15: it is not the raw serial)."""

    at: int
    length: int
    encoding: NumberEncoding
    drop_digits: int = 0  # leading digits to drop (T-Union: the leading 0 nibble, §2.3)
    check_digit: CheckDigit = CheckDigit.NONE
    source_file: str = "info"  # "info" (EF15 or the FCI copy) | "serial" (the serial file)


@dataclass(frozen=True, slots=True)
class CardTypeField:
    """Where a dialect's cards keep their card type (issue 13: discounts by card type).

    CJ/T 166 cards carry no card type in EF15; issuers keep it in their own EF05 (cpu-purse.md
    §2.3 "Other files", §6.1 "CJ/T 166 differences": Tianjin reads ``00 B0 85 00 12``), and S2
    reads a local T-Union card's "main card type" at EF15 byte 28 (§2.3). One byte at ``at`` of
    the info file (``sfi`` 0) or of the file ``sfi`` (in the MF when ``in_mf``).
    """

    at: int
    sfi: int = 0  # 0: the info file (EF15 or its FCI copy); else READ BINARY of this SFI
    in_mf: bool = False  # the file sits in the MF: SELECT 3F00, read, SELECT the application


@dataclass(frozen=True, slots=True)
class Dialect:
    """One issuer's way of laying out a purse application (profile data, issue 15).

    Matched, in profile order, on the application family, the FCI DF name (tag 84) and the
    first bytes of the info file (issuer id); then says where the info file's fields are, where
    the management data lives, which purse is debited and how the printed number is derived.
    Offsets are into the info file (EF15, or FCI tag 9F0C when the card copies it there).
    """

    name: str
    source: str
    family: Family
    df_name: bytes = b""  # FCI tag 84 must equal this; empty: any
    issuer_prefix: bytes = b""  # the info file must start with this; empty: any
    info_sfi: int = 0x15
    info_length: int = 30
    issuer_at: int = 0
    issuer_length: int = 8
    application_type_at: int = 8
    enable_flag_at: int = 9
    serial_at: int = 10
    serial_length: int = 10  # the last 8 bytes are the ASN the PSAM diversifies with (§2.3)
    serial_sfi: int = 0  # 0: the serial is in the info file; else READ BINARY of this SFI
    serial_file_length: int = 0
    serial_in_mf: bool = False  # the serial file sits in the MF: SELECT 3F00, read, re-SELECT
    start_date_at: int = 20
    expiry_date_at: int = 24
    city_at: int = 2  # BCD city code in the info file (CJ/T 166 §2.3), unless management data
    management: Management = Management.NONE
    purse: int = 0x02
    printed: PrintedNumber = PrintedNumber(10, 10, NumberEncoding.HEX)
    # Logs and trips (issue 15 findings 4-6): EF18's date-time encoding; the trip layout (None:
    # the card has no trip file, e.g. ADF 1001 cards).
    log_time: TimeEncoding = TimeEncoding.BCD
    trips: TripLayout | None = None
    # Balance semantics (finding 8): shown = raw * balance_scale - balance_offset (Macau Pass:
    # x 10 - 1000), minus the negative purse (GET BALANCE P1 = negative_purse_p1, 0: none) when
    # a card keeps one (Shanghai T-Union). The debit always uses the raw purse value.
    balance_scale: int = 1
    balance_offset: int = 0
    negative_purse_p1: int = 0
    # The city code naming the issuer of the printed number (issue 15: a printed-number
    # blacklist entry is issuer + number), for a dialect whose cards carry no reliable city
    # code (Shenzhen Tong's EF15[2..3] is 0000); empty: the card's city code.
    issuer_city: str = ""
    payment: bool = True  # False: read for a technician, refused at a tap (campus ED-only card)
    # Where the card type is (issue 13), for a dialect without management data (T-Union keeps
    # it in EF17[10] / FCI DF11); None: the cards give none, no card-type discount applies.
    card_type: CardTypeField | None = None

    def display_balance(self, raw: int, negative: int = 0) -> int:
        """The balance the issuer shows its cardholder, in fen."""
        return raw * self.balance_scale - self.balance_offset - negative

    def matches(self, family: Family, df_name: bytes | None, info: bytes | None) -> bool:
        if family is not self.family:
            return False
        if self.df_name and df_name != self.df_name:
            return False
        return info is None or info.startswith(self.issuer_prefix)


def standard_dialects() -> tuple[Dialect, ...]:
    """The layouts of cpu-purse.md §2.3, used after a profile's own dialects."""
    std = "shared/spec/cpu-purse.md §2.3"
    return (
        Dialect(
            "t-union",
            f"{std} (EF15 T-Union layout, EF17)",
            Family.TUNION,
            management=Management.EF17,
            printed=PrintedNumber(10, 10, NumberEncoding.HEX, drop_digits=1),
            trips=TUNION_EF1E,
            negative_purse_p1=0x01,
        ),
        Dialect(
            "cjt166",
            f"{std} (EF15 CJ/T 166 layout); number: the ASN EF15[12..19] as nfcim/nfsee "
            "assets/read.js ReadCityUnion shows it",
            Family.CJT166,
            printed=PrintedNumber(12, 8, NumberEncoding.HEX),
            trips=CJT166_CAPP,
        ),
        Dialect("legacy1001", f"{std} (EF15 CJ/T 166 layout behind ADF 1001)", Family.LEGACY_1001),
    )


@dataclass(frozen=True, slots=True)
class ReaderProfile:
    """``url``: serial port / ``socket://`` URL (serial) or nfcpy device path (nfcpy).
    ``card_reader`` / ``sam_reader``: PC/SC reader-name patterns (fnmatch style) of the
    contactless reader (pcsc) and of the contact reader holding the PSAM (pcsc, nfcpy)."""

    driver: str
    url: str
    baudrate: int = 115200
    timeout_s: float = 1.0
    poll_interval_s: float = 0.02
    sam_slot: int = 1
    framing: Mapping[str, Any] = field(default_factory=dict)
    card_reader: str = ""
    sam_reader: str = ""


SAM_ROUTES = ("tunion", "cjt166", "legacy1001", "m1")  # Family values and "m1"
PSAM_APPLICATION_PRESETS = ("tunion", "cjt166")  # agent.sam.psam.application_path


@dataclass(frozen=True, slots=True)
class SamSlotProfile:
    """One ``[[sam.slots]]`` entry: where a PSAM sits. ``slot``: the serial module's SAM slot
    number (driver serial); ``reader``: the PC/SC contact reader's name pattern (pcsc, nfcpy)."""

    name: str
    slot: int | None = None
    reader: str = ""

    @property
    def location(self) -> str:
        return f"module SAM slot {self.slot}" if self.slot is not None else f"reader {self.reader}"


@dataclass(frozen=True, slots=True)
class SamRouteProfile:
    """One ``[[sam.routes]]`` entry: the routes (card families, ``m1``) served by a slot's PSAM
    application, named by a preset (``tunion`` | ``cjt166``) or by ``fid`` and/or ``aid``."""

    families: tuple[str, ...]
    slot: str
    application: str = ""
    aid: bytes = b""
    fid: bytes = b""

    @property
    def label(self) -> str:
        if self.application:
            return self.application
        parts = [f"fid {self.fid.hex().upper()}"] if self.fid else []
        return " / ".join(parts + ([f"aid {self.aid.hex().upper()}"] if self.aid else []))


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    kind: ProfileKind
    source: str
    line: str
    operator_city: str
    double_tap_window_s: float
    recovery_window_s: float
    max_balance: int
    flat_fare: int
    reader: ReaderProfile
    sam_kind: str
    sam_application: str
    issuer_allow_list: tuple[str, ...]
    accepted_card_types: frozenset[int]
    applications: tuple[ApplicationProfile, ...]
    factor_order_card_first: bool
    sm4_session_key: str
    test_keys: tuple[Mapping[str, Any], ...] = ()
    lock_key_index: int = 1  # PSAM maintenance-key index for 80 1A 45 kid: 01 in S3, 02 in S2
    lock_permanent: bool = False  # APPLICATION BLOCK P2 01 (permanent) vs 00; meaning is L
    # MAC block of the lock: "card" asks INITIALIZE FOR PURCHASE for the card's algorithm (§3.1
    # byte 10: 00 3DES, 04 SM4); "3des" / "sm4" fix it for cards whose maintenance key differs.
    lock_algorithm: str = "card"
    # Raw [m1_purse] table; validated by agent.products.m1_layout.M1Layout.from_mapping.
    m1_purse: Mapping[str, Any] = field(default_factory=dict)
    # [[sam.slots]] / [[sam.routes]]; an old profile (sam.application) maps to one slot "psam"
    # with one route for every family. Empty: build that mapping from reader + sam_application.
    sam_slots: tuple[SamSlotProfile, ...] = ()
    sam_routes: tuple[SamRouteProfile, ...] = ()
    sam_retry_interval_s: float = 2.0  # a missing / mute PSAM slot is re-opened at most this often
    # [blacklist] expired_policy: what a tap does while the blacklist in force has expired (the
    # host stopped re-signing it, or the terminal has been offline past its expiry):
    #   keep_and_alarm   the last list stays in force; each tap logs an alarm (the default)
    #   refuse_issuers   cards of the issuers / city codes in expired_refuse_issuers are refused
    #                    (blacklist_expired); the others are served on the last list, with alarm
    #   refuse_all       every card not already locked is refused (blacklist_expired)
    blacklist_expired_policy: str = "keep_and_alarm"
    blacklist_expired_refuse_issuers: tuple[str, ...] = ()
    # crypto.sm4_load_session_key: the SM4 form of SESLK (UNCONFIRMED, cpu-purse.md §5.6, §10
    # item 1): agent.crypto.SM4_LOAD_SESSION_KEY_VARIANTS ("pad80", "complement")
    sm4_load_session_key: str = "pad80"
    # Issuer dialects (issue 15): the profile's own, then the standard layouts of §2.3.
    dialects: tuple[Dialect, ...] = field(default_factory=standard_dialects)
    # [pos] max_amount: the largest amount (fen) one POS purchase may take (``cardagent pos``);
    # 0 when the profile has no [pos] section (the POS front end then refuses to start).
    pos_max_amount: int = 0
    # [merchant] id / category (issue 11): written into every purchase record ("" = none).
    merchant_id: str = ""
    merchant_category: str = ""
    # What a trip record says about this terminal (issue 15 finding 5): the acceptor
    # institution's code (4 bytes in real T-Union records, padded with FF), station, vehicle.
    institution: bytes = b""
    station: int = 0
    vehicle: int = 0
    # [clock] (agent.clock): what a tap does while the real-time clock is unreliable (it went
    # back, reads before the last record or the build date, or jumped forward):
    #   last_good_plus_elapsed  keep taking cards at the last good time + monotonic time elapsed
    #   refuse                  refuse every tap (clock_unreliable) until the clock is good again
    clock_policy: str = "last_good_plus_elapsed"
    clock_max_step_s: float = 300.0  # a wall-clock step larger than this (either way) is suspect
    clock_not_before: dt.date | None = None  # the profile's build date: earlier clocks are wrong

    @property
    def is_production(self) -> bool:
        return self.kind is ProfileKind.PRODUCTION


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{what} {path}: file not found") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"{what} {path}: unreadable: {exc}") from exc


def load_profile(path: Path | str) -> Profile:
    """Read and validate a profile file (and the dialect fragments it names, relative to it)."""
    path = Path(path)
    raw = _read_toml(path, "profile")
    return parse_profile(raw, source=str(path), base_dir=path.parent)


def load_dialects(path: Path | str) -> tuple[Dialect, ...]:
    """Read and validate a dialect fragment: a TOML file of ``[[dialect]]`` tables only."""
    path = Path(path)
    raw = _read_toml(path, "dialect file")
    r = _Reader(raw, str(path))
    r.only_known("", raw, ("dialect",))
    return tuple(
        _dialect(r, f"dialect[{i}]", table) for i, table in enumerate(r.list_of_tables("dialect"))
    )


def parse_profile(
    raw: Mapping[str, Any], source: str = "<profile>", *, base_dir: Path | None = None
) -> Profile:
    """Validate a profile already parsed from TOML. ``cpu_purse.dialect_files`` are read
    relative to ``base_dir`` (the profile's directory; the working directory if not given)."""
    r = _Reader(raw, source)
    kind = r.enum("profile.kind", ProfileKind)
    test_keys = tuple(r.list_of_tables("test_keys.keys", required=False))
    if kind is ProfileKind.PRODUCTION and test_keys:
        raise ConfigurationError(f"{source}: a production profile must not carry test_keys")
    r.validated("", KeySet.from_mapping, test_keys)
    sam_kind = r.choice("sam.kind", ("psam", "software"))
    if kind is ProfileKind.PRODUCTION and sam_kind == "software":
        raise ConfigurationError(f"{source}: sam.kind 'software' is refused by production profiles")
    applications = tuple(
        _application(_Reader(app, f"{source} cpu_purse.applications[{i}]"))
        for i, app in enumerate(r.list_of_tables("cpu_purse.applications"))
    )
    if not applications:
        raise ConfigurationError(f"{source}: cpu_purse.applications is empty")
    factor_order = r.choice(
        "crypto.factor_order", ("card-first-reversed", "as-listed"), default="card-first-reversed"
    )
    sam_application, sam_slots, sam_routes = _sam_routing(r, sam_kind, applications)
    return Profile(
        name=r.string("profile.name"),
        kind=kind,
        source=source,
        line=r.digits("terminal.line", 4),
        operator_city=r.digits("terminal.operator_city", 4),
        double_tap_window_s=r.number(
            "terminal.double_tap_window_s", minimum=0.0, maximum=MAX_DOUBLE_TAP_WINDOW_S
        ),
        recovery_window_s=r.number(
            "terminal.recovery_window_s", minimum=1.0, maximum=MAX_RECOVERY_WINDOW_S
        ),
        max_balance=r.integer("terminal.max_balance", minimum=1, maximum=0x7FFFFFFF),
        flat_fare=r.integer("fare.flat_fare", minimum=0, maximum=0xFFFFFFFF),
        reader=_reader_profile(r, sam_kind),
        sam_kind=sam_kind,
        sam_application=sam_application,
        sam_slots=sam_slots,
        sam_routes=sam_routes,
        sam_retry_interval_s=r.number(
            "sam.retry_interval_s", minimum=0.01, maximum=3600.0, default=2.0
        ),
        issuer_allow_list=tuple(
            r.hex_string(f"qualification.issuer_allow_list[{i}]", s)
            for i, s in enumerate(r.list_("qualification.issuer_allow_list"))
        ),
        accepted_card_types=frozenset(
            r.int_value(f"qualification.accepted_card_types[{i}]", v, 0, 255)
            for i, v in enumerate(r.list_("qualification.accepted_card_types"))
        ),
        applications=applications,
        factor_order_card_first=factor_order == "card-first-reversed",
        sm4_session_key=r.choice("crypto.sm4_session_key", ("pad80",), default="pad80"),
        sm4_load_session_key=r.choice(
            "crypto.sm4_load_session_key", ("pad80", "complement"), default="pad80"
        ),
        test_keys=test_keys,
        lock_key_index=r.integer("blacklist.lock_key_index", minimum=0, maximum=255, default=1),
        lock_permanent=r.boolean("blacklist.lock_permanent", default=False),
        lock_algorithm=r.choice(
            "blacklist.lock_algorithm", ("card", "3des", "sm4"), default="card"
        ),
        m1_purse=_m1_purse(r),
        **_expired_blacklist_policy(r),
        dialects=_dialects(r, applications, base_dir),
        pos_max_amount=_pos(r),
        **_merchant(r),
        **_trip_parameters(r),
        **_clock_settings(r),
    )


def _pos(r: _Reader) -> int:
    """``[pos] max_amount``: fen per POS purchase, 1..0xFFFFFFFF (the purse's amount field)."""
    pos = r.table("pos", required=False)
    r.only_known("pos", pos, ("max_amount",))
    if not pos:
        return 0
    return r.integer("pos.max_amount", minimum=1, maximum=0xFFFFFFFF)


def _merchant(r: _Reader) -> dict[str, Any]:
    """``[merchant] id`` and ``category`` (both or neither; see :mod:`agent.merchant`)."""
    table = r.table("merchant", required=False)
    r.only_known("merchant", table, ("id", "category"))
    if not table:
        return {}
    merchant_id = r.string("merchant.id")
    if (problem := merchant_id_problem(merchant_id)) is not None:
        raise r.fail("merchant.id", problem, merchant_id)
    category = r.string("merchant.category")
    if (problem := category_problem(category)) is not None:
        raise r.fail("merchant.category", problem, category)
    return {"merchant_id": merchant_id, "merchant_category": category}


def _trip_parameters(r: _Reader) -> dict[str, Any]:
    """``terminal.institution`` (hex, 1..8 bytes; default: the operator city + 0000),
    ``terminal.station`` and ``terminal.vehicle`` (integers) for the trip records."""
    city = r.digits("terminal.operator_city", 4)
    text = r.get("terminal.institution", city + "0000")
    institution = _hex_field(r, "terminal.institution", text, 1, 8)
    return {
        "institution": institution,
        "station": r.integer("terminal.station", minimum=0, maximum=0xFFFFFFFF, default=0),
        "vehicle": r.integer("terminal.vehicle", minimum=0, maximum=0xFFFFFFFF, default=0),
    }


CLOCK_POLICIES = ("last_good_plus_elapsed", "refuse")
_CLOCK_KEYS = ("policy", "max_step_s", "not_before")


def _clock_settings(r: _Reader) -> dict[str, Any]:
    """``[clock] policy``, ``max_step_s`` (1 s .. 1 day) and ``not_before`` (a TOML date: the
    profile's build date; a clock reading earlier is unreliable)."""
    r.only_known("clock", r.table("clock", required=False), _CLOCK_KEYS)
    not_before = r.get("clock.not_before", None)
    if not_before is not None and (
        not isinstance(not_before, dt.date) or isinstance(not_before, dt.datetime)
    ):
        raise r.fail("clock.not_before", "must be a TOML date (YYYY-MM-DD)", not_before)
    return {
        "clock_policy": r.choice("clock.policy", CLOCK_POLICIES, default="last_good_plus_elapsed"),
        "clock_max_step_s": r.number(
            "clock.max_step_s", minimum=1.0, maximum=86400.0, default=300.0
        ),
        "clock_not_before": not_before,
    }


EXPIRED_POLICIES = ("keep_and_alarm", "refuse_issuers", "refuse_all")


def _expired_blacklist_policy(r: _Reader) -> dict[str, Any]:
    """``[blacklist] expired_policy`` and ``expired_refuse_issuers`` (issuer prefixes or city
    codes, hex, matched as the issuer allow-list is); ``refuse_issuers`` needs at least one."""
    policy = r.choice("blacklist.expired_policy", EXPIRED_POLICIES, default="keep_and_alarm")
    raw = r.get("blacklist.expired_refuse_issuers", [])
    if not isinstance(raw, list):
        raise r.fail("blacklist.expired_refuse_issuers", "must be a list", raw)
    issuers = tuple(
        r.hex_string(f"blacklist.expired_refuse_issuers[{i}]", s) for i, s in enumerate(raw)
    )
    if policy == "refuse_issuers" and not issuers:
        raise r.fail(
            "blacklist.expired_refuse_issuers",
            "must list at least one issuer with expired_policy 'refuse_issuers'",
            raw,
        )
    return {"blacklist_expired_policy": policy, "blacklist_expired_refuse_issuers": issuers}


def _reader_profile(r: _Reader, sam_kind: str) -> ReaderProfile:
    driver = r.choice("reader.driver", ("serial", "pcsc", "nfcpy"))
    reader = ReaderProfile(
        driver=driver,
        url=r.string("reader.url", default=""),
        baudrate=r.integer("reader.baudrate", minimum=1200, maximum=MAX_BAUDRATE, default=115200),
        timeout_s=r.number("reader.timeout_s", minimum=0.01, maximum=60.0, default=1.0),
        poll_interval_s=r.number(
            "reader.poll_interval_s", minimum=0.001, maximum=5.0, default=0.02
        ),
        sam_slot=r.integer("reader.sam_slot", minimum=0, maximum=15, default=1),
        framing=_framing(r),
        card_reader=r.string("reader.card_reader", default=""),
        sam_reader=r.string("reader.sam_reader", default=""),
    )
    if driver in ("serial", "nfcpy") and not reader.url:
        raise r.fail("reader.url", f"is required by driver '{driver}'", reader.url)
    if driver == "pcsc" and not reader.card_reader:
        raise r.fail("reader.card_reader", "is required by driver 'pcsc'", reader.card_reader)
    if driver != "serial" and sam_kind == "psam" and not reader.sam_reader and _default_sam(r):
        raise r.fail(
            "reader.sam_reader",
            f"is required for a PSAM with driver '{driver}' (a PC/SC contact reader)",
            reader.sam_reader,
        )
    return reader


def _default_sam(r: _Reader) -> bool:
    """Whether some PSAM sits where ``[reader]`` says (an old profile, or a slot without a
    location of its own)."""
    slots = r.get("sam.slots", [])
    if not isinstance(slots, list) or not slots:
        return True
    return any(not isinstance(s, Mapping) or ("reader" not in s and "slot" not in s) for s in slots)


_SAM_KEYS = frozenset({"kind", "application", "slots", "routes", "retry_interval_s"})
_SLOT_KEYS = frozenset({"name", "slot", "reader"})
_ROUTE_KEYS = frozenset({"families", "slot", "application", "aid", "fid"})


def _sam_routing(
    r: _Reader, sam_kind: str, applications: tuple[ApplicationProfile, ...]
) -> tuple[str, tuple[SamSlotProfile, ...], tuple[SamRouteProfile, ...]]:
    """``[sam]``: (legacy application name, slots, routes), validated whole.

    Without ``[[sam.slots]]`` / ``[[sam.routes]]`` the old shape (``sam.application``,
    ``reader.sam_slot`` / ``reader.sam_reader``) is one slot ``psam`` whose application serves
    every route. Otherwise every slot name is unique and used, every route's slot exists, no
    route (family or ``m1``) is served twice, and every family of ``cpu_purse.applications``
    (and ``m1`` with ``[m1_purse]``) has a route.
    """
    sam = r.table("sam")
    r.only_known("sam", sam, _SAM_KEYS)
    driver = r.choice("reader.driver", ("serial", "pcsc", "nfcpy"))
    default_slot = r.integer("reader.sam_slot", minimum=0, maximum=15, default=1)
    default_reader = r.string("reader.sam_reader", default="")
    psam = sam_kind == "psam"

    def default_location(name: str) -> SamSlotProfile:
        if driver == "serial":
            return SamSlotProfile(name, slot=default_slot)
        if psam and not default_reader:
            raise r.fail(
                "reader.sam_reader",
                f"is required for a PSAM with driver '{driver}' (a PC/SC contact reader) unless "
                "every [[sam.slots]] entry names its reader",
                default_reader,
            )
        return SamSlotProfile(name, reader=default_reader)

    if "slots" not in sam and "routes" not in sam:
        application = r.choice("sam.application", PSAM_APPLICATION_PRESETS, default="tunion")
        route = SamRouteProfile(SAM_ROUTES, "psam", application=application)
        return application, (default_location("psam"),), (route,)
    if "application" in sam:
        raise r.fail(
            "sam.application", "cannot be combined with [[sam.routes]]", sam["application"]
        )
    if "slots" not in sam or "routes" not in sam:
        missing = "sam.routes" if "slots" in sam else "sam.slots"
        raise r.fail(missing, "is required with [[sam.slots]] / [[sam.routes]]", None)

    slots: list[SamSlotProfile] = []
    for i, raw in enumerate(r.list_of_tables("sam.slots")):
        at = f"sam.slots[{i}]"
        r.only_known(at, raw, _SLOT_KEYS)
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise r.fail(f"{at}.name", "must be a non-empty string", name)
        if any(s.name == name for s in slots):
            raise r.fail(f"{at}.name", "names a slot already defined", name)
        if "slot" in raw:
            if driver != "serial":
                raise r.fail(
                    f"{at}.slot",
                    f"is for driver 'serial'; driver '{driver}' needs reader",
                    raw["slot"],
                )
            entry = SamSlotProfile(name, slot=r.int_value(f"{at}.slot", raw["slot"], 0, 15))
        elif "reader" in raw:
            if driver == "serial":
                raise r.fail(
                    f"{at}.reader",
                    "is for drivers pcsc / nfcpy; driver 'serial' needs slot",
                    raw["reader"],
                )
            pattern = raw["reader"]
            if not isinstance(pattern, str) or not pattern:
                raise r.fail(f"{at}.reader", "must be a non-empty reader-name pattern", pattern)
            entry = SamSlotProfile(name, reader=pattern)
        else:
            entry = default_location(name)
        if entry.location in (s.location for s in slots):
            field_name = "slot" if entry.slot is not None else "reader"
            raise r.fail(f"{at}.{field_name}", "is the location of another slot", entry.location)
        slots.append(entry)

    routes: list[SamRouteProfile] = []
    served: dict[str, int] = {}
    for i, raw in enumerate(r.list_of_tables("sam.routes")):
        at = f"sam.routes[{i}]"
        r.only_known(at, raw, _ROUTE_KEYS)
        families = raw.get("families")
        if not isinstance(families, list) or not families:
            raise r.fail(
                f"{at}.families", f"must be a non-empty list of {', '.join(SAM_ROUTES)}", families
            )
        for family in families:
            if family not in SAM_ROUTES:
                raise r.fail(f"{at}.families", f"must hold only {', '.join(SAM_ROUTES)}", family)
            if family in served:
                raise r.fail(
                    f"{at}.families",
                    f"routes {family!r} already routed by sam.routes[{served[family]}]",
                    family,
                )
            served[family] = i
        slot = raw.get("slot")
        if not isinstance(slot, str) or not any(s.name == slot for s in slots):
            names = ", ".join(s.name for s in slots)
            raise r.fail(f"{at}.slot", f"must name a [[sam.slots]] entry ({names})", slot)
        application = raw.get("application", "")
        aid = _hex_field(r, f"{at}.aid", raw.get("aid", ""), 5, 16)
        fid = _hex_field(r, f"{at}.fid", raw.get("fid", ""), 2, 2)
        if application:
            if application not in PSAM_APPLICATION_PRESETS:
                raise r.fail(
                    f"{at}.application",
                    f"must be one of {', '.join(PSAM_APPLICATION_PRESETS)}",
                    application,
                )
            if aid or fid:
                raise r.fail(
                    f"{at}.application", "is a preset: give it or aid / fid, not both", application
                )
        elif not (aid or fid):
            raise r.fail(
                f"{at}.application",
                "is required (a preset) unless aid / fid name the PSAM application",
                application,
            )
        routes.append(
            SamRouteProfile(tuple(families), slot, application=application, aid=aid, fid=fid)
        )

    needed = [(app.family.value, "cpu_purse.applications") for app in applications]
    if r.get("m1_purse", {}):
        needed.append(("m1", "[m1_purse]"))
    for family, why in needed:
        if family not in served:
            raise r.fail(
                "sam.routes", f"routes no SAM for {family!r} (used by {why})", sorted(served)
            )
    for i, entry in enumerate(slots):
        if not any(route.slot == entry.name for route in routes):
            raise r.fail(f"sam.slots[{i}].name", "is used by no [[sam.routes]] entry", entry.name)
    first = routes[0].application or "tunion"
    return first, tuple(slots), tuple(routes)


def _hex_field(r: _Reader, dotted: str, value: Any, low: int, high: int) -> bytes:
    if value == "":
        return b""
    if not isinstance(value, str):
        raise r.fail(dotted, "must be a hex string", value)
    data = r.hex_bytes(dotted, value)
    if not low <= len(data) <= high:
        size = f"{low}" if low == high else f"{low}..{high}"
        raise r.fail(dotted, f"must be {size} bytes", value)
    return data


def _framing(r: _Reader) -> Mapping[str, Any]:
    """``[reader.framing]``, checked by the serial driver's own validator (kept raw)."""
    framing = r.table("reader.framing", required=False)
    for name, low, high in (("length_bytes", 1, 2), ("max_payload", 1, 0xFFFF)):
        if name in framing:
            r.integer(f"reader.framing.{name}", minimum=low, maximum=high)
    r.validated("reader.", Framing.from_mapping, framing)
    return framing


def _m1_purse(r: _Reader) -> Mapping[str, Any]:
    """``[m1_purse]``, checked by :meth:`M1Layout.from_mapping` at load (kept raw)."""
    m1_purse = r.table("m1_purse", required=False)
    if m1_purse:
        M1Layout.from_mapping(m1_purse, f"{r.source} m1_purse")
    return m1_purse


def _application(r: _Reader) -> ApplicationProfile:
    family = r.enum("family", Family)
    select = r.enum("select", Selection)
    aid_text = r.string("aid", default=DEFAULT_AIDS[family].hex())
    aid = r.hex_bytes("aid", aid_text) if aid_text else b""
    if select is not Selection.FID and not 5 <= len(aid) <= 16:
        raise ConfigurationError(f"{r.source}: aid must be 5..16 bytes for select '{select.value}'")
    flow = r.enum("flow", Flow)
    if flow is Flow.COMPOUND and family is Family.LEGACY_1001:
        raise ConfigurationError(
            f"{r.source}: flow 'compound' needs a CAPP file; ADF 1001 has none"
        )
    return ApplicationProfile(
        family=family,
        select=select,
        flow=flow,
        aid=aid,
        ppse_label=r.string("ppse_label", default="MOT_T_EP"),
        ef17_length=r.integer("ef17_length", minimum=11, maximum=0x3C, default=0x3C),
        ef1e_industry=r.integer("ef1e_industry", minimum=0, maximum=0xFF, default=0x02),
    )


_DIALECT_KEYS = frozenset(
    {
        "name", "source", "family", "df_name", "issuer_prefix", "info_sfi", "info_length",
        "issuer_at", "issuer_length", "application_type_at", "enable_flag_at", "serial_at",
        "serial_length", "serial_sfi", "serial_file_length", "serial_in_mf", "start_date_at",
        "expiry_date_at",
        "city_at", "management", "purse", "number_at", "number_length", "number_encoding",
        "number_drop_digits", "number_check_digit", "number_file", "log_time", "trips",
        "balance_scale", "balance_offset", "negative_purse_p1", "payment", "issuer_city",
        "card_type",
    }
)  # fmt: skip
_CARD_TYPE_KEYS = frozenset({"at", "sfi", "file", "in_mf"})
MAX_INFO_LENGTH = 0xFF  # one short READ BINARY


def _dialects(
    r: _Reader, applications: tuple[ApplicationProfile, ...], base_dir: Path | None
) -> tuple[Dialect, ...]:
    """``cpu_purse.dialects`` (inline) and ``cpu_purse.dialect_files`` (fragments), in that
    order, then (unless ``cpu_purse.standard_dialects = false``) the §2.3 layouts. Every family
    of ``cpu_purse.applications`` needs a dialect; names are unique."""
    found = [
        _dialect(r, f"cpu_purse.dialects[{i}]", table)
        for i, table in enumerate(r.list_of_tables("cpu_purse.dialects", required=False))
    ]
    files = r.get("cpu_purse.dialect_files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise r.fail("cpu_purse.dialect_files", "must be a list of file names", files)
    for i, name in enumerate(files):
        path = (base_dir or Path.cwd()) / name
        try:
            found.extend(load_dialects(path))
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"{r.source}: field 'cpu_purse.dialect_files[{i}]': {exc}"
            ) from exc
    if r.boolean("cpu_purse.standard_dialects", default=True):
        found.extend(standard_dialects())
    names: set[str] = set()
    for dialect in found:
        if dialect.name in names:
            raise r.fail("cpu_purse.dialects", "names a dialect twice", dialect.name)
        names.add(dialect.name)
    for app in applications:
        if not any(d.family is app.family for d in found):
            raise r.fail(
                "cpu_purse.dialects", f"has no dialect for family {app.family.value!r}", None
            )
    return tuple(found)


def _dialect(r: _Reader, at: str, raw: Mapping[str, Any]) -> Dialect:
    """One dialect table, validated whole: every field inside the file it reads."""
    r.only_known(at, raw, _DIALECT_KEYS)

    def num(key: str, low: int, high: int, default: int) -> int:
        return r.int_value(f"{at}.{key}", raw.get(key, default), low, high)

    def hex_(key: str, high: int) -> bytes:
        return _hex_field(r, f"{at}.{key}", raw.get(key, ""), 1, high)

    def choice(key: str, cls: type[E], default: E) -> E:
        value = raw.get(key, default.value)
        try:
            return cls(value)
        except ValueError as exc:
            options = ", ".join(str(m.value) for m in cls)
            raise r.fail(f"{at}.{key}", f"must be one of {options}", value) from exc

    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise r.fail(f"{at}.name", "must be a non-empty string", name)
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise r.fail(f"{at}.source", "must cite where the layout comes from", source)
    if "family" not in raw:
        raise r.fail(f"{at}.family", "is required", None)
    info_length = num("info_length", 16, MAX_INFO_LENGTH, 30)
    serial_sfi = num("serial_sfi", 0, 30, 0)
    serial_file_length = num("serial_file_length", 0, MAX_INFO_LENGTH, 0)
    if serial_sfi and not serial_file_length:
        raise r.fail(f"{at}.serial_file_length", "is required with serial_sfi", 0)
    serial_in_mf = raw.get("serial_in_mf", False)
    if not isinstance(serial_in_mf, bool):
        raise r.fail(f"{at}.serial_in_mf", "must be true or false", serial_in_mf)
    if serial_in_mf and not serial_sfi:
        raise r.fail(f"{at}.serial_in_mf", "needs serial_sfi", serial_in_mf)
    serial_space = serial_file_length if serial_sfi else info_length
    purse = raw.get("purse", "ep")
    if purse not in PURSES:
        raise r.fail(f"{at}.purse", f"must be one of {', '.join(PURSES)}", purse)
    number_file = raw.get("number_file", "info")
    if number_file not in ("info", "serial"):
        raise r.fail(f"{at}.number_file", "must be one of info, serial", number_file)
    if number_file == "serial" and not serial_sfi:
        raise r.fail(f"{at}.number_file", "'serial' needs serial_sfi", number_file)
    encoding = choice("number_encoding", NumberEncoding, NumberEncoding.HEX)
    number_space = serial_space if number_file == "serial" else info_length
    max_number = number_space if encoding is NumberEncoding.HEX else 8  # 64-bit integers
    dialect = Dialect(
        name=name,
        source=source,
        family=choice("family", Family, Family.LEGACY_1001),
        df_name=hex_("df_name", 16),
        issuer_prefix=hex_("issuer_prefix", 8),
        info_sfi=num("info_sfi", 1, 30, 0x15),
        info_length=info_length,
        issuer_at=num("issuer_at", 0, info_length - 1, 0),
        issuer_length=num("issuer_length", 1, 8, 8),
        application_type_at=num("application_type_at", -1, info_length - 1, 8),
        enable_flag_at=num("enable_flag_at", -1, info_length - 1, 9),
        serial_at=num("serial_at", 0, serial_space - 8, 10),
        serial_length=num("serial_length", 8, 10, 10),
        serial_sfi=serial_sfi,
        serial_file_length=serial_file_length,
        serial_in_mf=serial_in_mf,
        start_date_at=num("start_date_at", 0, info_length - 4, 20),
        expiry_date_at=num("expiry_date_at", 0, info_length - 4, 24),
        city_at=num("city_at", 0, info_length - 2, 2),
        management=choice("management", Management, Management.NONE),
        purse=PURSES[purse],
        printed=PrintedNumber(
            at=num("number_at", 0, number_space - 1, 10),
            length=num("number_length", 1, max_number, 10),
            encoding=encoding,
            drop_digits=num("number_drop_digits", 0, 19, 0),
            check_digit=choice("number_check_digit", CheckDigit, CheckDigit.NONE),
            source_file=number_file,
        ),
    )
    ends = (
        ("issuer_length", dialect.issuer_at + dialect.issuer_length, info_length),
        ("serial_length", dialect.serial_at + dialect.serial_length, serial_space),
        ("number_length", dialect.printed.at + dialect.printed.length, number_space),
    )
    for key, end, space in ends:
        if end > space:
            raise r.fail(f"{at}.{key}", f"runs past the {space}-byte file (ends at {end})", end)
    if dialect.management is Management.EF17 and dialect.family is not Family.TUNION:
        raise r.fail(f"{at}.management", "'ef17' is the T-Union file (family tunion)", "ef17")
    payment = raw.get("payment", True)
    if not isinstance(payment, bool):
        raise r.fail(f"{at}.payment", "must be true or false", payment)
    issuer_city = raw.get("issuer_city", "")
    if issuer_city != "" and not (
        isinstance(issuer_city, str)
        and len(issuer_city) == 4
        and issuer_city.isascii()
        and issuer_city.isdigit()
    ):
        raise r.fail(f"{at}.issuer_city", "must be a 4-digit city code (e.g. 5180)", issuer_city)
    return replace(
        dialect,
        log_time=choice("log_time", TimeEncoding, TimeEncoding.BCD),
        trips=_trips(r, f"{at}.trips", raw.get("trips"), dialect.family),
        balance_scale=num("balance_scale", 1, 1000, 1),
        balance_offset=num("balance_offset", 0, 0x7FFFFFFF, 0),
        negative_purse_p1=num(
            "negative_purse_p1", 0, 3, 1 if dialect.family is Family.TUNION else 0
        ),
        payment=payment,
        issuer_city=issuer_city,
        card_type=_card_type(r, f"{at}.card_type", raw.get("card_type"), dialect),
    )


def _card_type(r: _Reader, at: str, raw: Any, dialect: Dialect) -> CardTypeField | None:
    """A dialect's ``card_type`` table: ``{ file = "info" | "serial", at = N }`` or ``{ sfi =
    N, at = N [, in_mf = true] }``; the byte must lie inside the file, and a file the dialect
    already reads (the info or serial file) is named as such, so it is read once."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise r.fail(at, "must be a table, e.g. { sfi = 5, at = 18 }", raw)
    r.only_known(at, raw, _CARD_TYPE_KEYS)
    if dialect.management is not Management.NONE:
        raise r.fail(
            at,
            f"is given by the management data ({dialect.management.value}, byte 10); "
            "card_type is for dialects without",
            dict(raw),
        )
    if ("file" in raw) == ("sfi" in raw):
        raise r.fail(at, "needs exactly one of file (info | serial) or sfi", dict(raw))
    in_mf = raw.get("in_mf", False)
    if not isinstance(in_mf, bool):
        raise r.fail(f"{at}.in_mf", "must be true or false", in_mf)
    if "file" in raw:
        file = raw["file"]
        if file not in ("info", "serial"):
            raise r.fail(f"{at}.file", "must be one of info, serial", file)
        if in_mf:
            raise r.fail(f"{at}.in_mf", "goes with sfi, not file", in_mf)
        if file == "serial" and not dialect.serial_sfi:
            raise r.fail(f"{at}.file", "'serial' needs serial_sfi", file)
        sfi = dialect.serial_sfi if file == "serial" else 0
        in_mf = dialect.serial_in_mf if file == "serial" else False
    else:
        sfi = r.int_value(f"{at}.sfi", raw["sfi"], 1, 30)
        if sfi == dialect.info_sfi:
            raise r.fail(f"{at}.sfi", 'is the info file: write file = "info"', sfi)
        if sfi == dialect.serial_sfi and in_mf != dialect.serial_in_mf:
            where = "in the MF" if dialect.serial_in_mf else "in the application"
            raise r.fail(f"{at}.in_mf", f"differs from serial_in_mf: EF{sfi:02X} is {where}", in_mf)
    if sfi == 0:
        space = dialect.info_length
    elif sfi == dialect.serial_sfi:
        space = dialect.serial_file_length
    else:
        space = MAX_INFO_LENGTH
    if "at" not in raw:
        raise r.fail(f"{at}.at", "is required", None)
    return CardTypeField(at=r.int_value(f"{at}.at", raw["at"], 0, space - 1), sfi=sfi, in_mf=in_mf)


_TRIP_KEYS = frozenset({"base"} | {f.name for f in fields(TripLayout)})


def _trips(r: _Reader, at: str, raw: Any, family: Family) -> TripLayout | None:
    """A dialect's ``trips`` table: the family's standard layout (``base``: tunion | cjt166 |
    none) with the fields the table overrides; validated whole (inside the record, no two
    fields on the same byte)."""
    if raw is None:
        return STANDARD_TRIPS.get(family.value)
    if not isinstance(raw, Mapping):
        raise r.fail(at, "must be a table", raw)
    r.only_known(at, raw, _TRIP_KEYS)
    base_name = raw.get("base", family.value if family.value in STANDARD_TRIPS else "none")
    if base_name == "none":
        if len(raw) > 1:
            raise r.fail(f"{at}.base", "'none' takes no other field", base_name)
        return None
    if base_name not in STANDARD_TRIPS:
        raise r.fail(f"{at}.base", "must be one of tunion, cjt166, none", base_name)
    layout = STANDARD_TRIPS[base_name]
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "base":
            continue
        if key == "header":
            changes[key] = _hex_field(r, f"{at}.header", value, 1, 8) if value else b""
        elif key in ("line_encoding", "time_encoding"):
            cls: type[enum.Enum] = FieldEncoding if key == "line_encoding" else TimeEncoding
            try:
                changes[key] = cls(value)
            except ValueError as exc:
                options = ", ".join(str(m.value) for m in cls)
                raise r.fail(f"{at}.{key}", f"must be one of {options}", value) from exc
        elif key == "by_identifier":
            if not isinstance(value, bool):
                raise r.fail(f"{at}.{key}", "must be true or false", value)
            changes[key] = value
        else:
            changes[key] = r.int_value(f"{at}.{key}", value, -1, 0xFF)
    layout = replace(layout, **changes)
    check_trip_layout(layout, lambda key, what, value: r.fail(f"{at}.{key}", what, value))
    return layout


_MISSING = object()


class _Reader:
    """Typed access to a nested TOML mapping with error messages that name the field."""

    def __init__(self, raw: Mapping[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def get(self, dotted: str, default: Any = _MISSING) -> Any:
        node: Any = self.raw
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                if default is _MISSING:
                    raise ConfigurationError(f"{self.source}: missing field '{dotted}'")
                return default
            node = node[part]
        return node

    def fail(self, dotted: str, what: str, value: Any) -> ConfigurationError:
        return ConfigurationError(f"{self.source}: field '{dotted}' {what}, got {value!r}")

    def only_known(self, at: str, raw: Mapping[str, Any], known: Collection[str]) -> None:
        """Refuse a key of table ``at`` that is not in ``known`` (a typo must not pass)."""
        for key in raw:
            if key not in known:
                raise self.fail(
                    f"{at}.{key}", f"is unknown (known: {', '.join(sorted(known))})", key
                )

    def string(self, dotted: str, default: Any = _MISSING) -> str:
        value = self.get(dotted, default)
        if not isinstance(value, str):
            raise self.fail(dotted, "must be a string", value)
        return value

    def digits(self, dotted: str, length: int) -> str:
        value = self.string(dotted)
        if len(value) != length or not value.isdigit():
            raise self.fail(dotted, f"must be {length} decimal digits", value)
        return value

    def hex_string(self, dotted: str, value: Any) -> str:
        if not isinstance(value, str) or not value or len(value) % 2:
            raise self.fail(dotted, "must be an even-length hex string", value)
        self.hex_bytes(dotted, value)
        return value.upper()

    def hex_bytes(self, dotted: str, value: str) -> bytes:
        try:
            return bytes.fromhex(value)
        except ValueError as exc:
            raise self.fail(dotted, "must be hex", value) from exc

    def integer(
        self, dotted: str, *, minimum: int, maximum: int | None = None, default: Any = _MISSING
    ) -> int:
        return self.int_value(dotted, self.get(dotted, default), minimum, maximum)

    def int_value(self, dotted: str, value: Any, minimum: int, maximum: int | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(dotted, "must be an integer", value)
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise self.fail(dotted, f"must be {bounds}", value)
        return value

    def number(
        self,
        dotted: str,
        *,
        minimum: float,
        maximum: float | None = None,
        default: Any = _MISSING,
    ) -> float:
        """A finite number in ``minimum..maximum``: NaN and infinities are always refused (TOML
        has ``nan`` and ``inf`` literals, and NaN compares false with every bound)."""
        value = self.get(dotted, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(dotted, "must be a number", value)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(dotted, "must be a finite number", value)
        top = sys.float_info.max if maximum is None else maximum
        if not minimum <= value <= top:
            bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise self.fail(dotted, f"must be {bounds}", value)
        return float(value)

    def validated(self, prefix: str, check: Callable[[Any], object], value: Any) -> None:
        """Run another module's validator at load; its messages name fields from ``prefix``
        on (``framing.start`` under ``reader.``): add the file and the prefix."""
        try:
            check(value)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{self.source}: {prefix}{exc}") from exc

    def boolean(self, dotted: str, default: Any = _MISSING) -> bool:
        value = self.get(dotted, default)
        if not isinstance(value, bool):
            raise self.fail(dotted, "must be true or false", value)
        return value

    def choice(self, dotted: str, options: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self.string(dotted, default)
        if value not in options:
            raise self.fail(dotted, f"must be one of {', '.join(options)}", value)
        return value

    def enum(self, dotted: str, cls: type[E]) -> E:
        value = self.string(dotted)
        try:
            return cls(value)
        except ValueError as exc:
            options = ", ".join(str(m.value) for m in cls)
            raise self.fail(dotted, f"must be one of {options}", value) from exc

    def list_(self, dotted: str) -> list[Any]:
        value = self.get(dotted)
        if not isinstance(value, list):
            raise self.fail(dotted, "must be a list", value)
        return value

    def list_of_tables(self, dotted: str, *, required: bool = True) -> list[Mapping[str, Any]]:
        value = self.get(dotted, _MISSING if required else [])
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.fail(dotted, "must be a list of tables", value)
        return value

    def table(self, dotted: str, *, required: bool = True) -> Mapping[str, Any]:
        value = self.get(dotted, _MISSING if required else {})
        if not isinstance(value, Mapping):
            raise self.fail(dotted, "must be a table", value)
        return value
