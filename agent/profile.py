"""Firmware profiles: everything city-specific, as validated data.

A profile is a TOML file (see ``firmware_profiles/``). Facts that the specs mark below H are
profile options, never constants. Loading validates every field and raises
:class:`ConfigurationError` naming the file and the field at fault.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigurationError

E = TypeVar("E", bound=enum.Enum)


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
    # Raw [m1_purse] table; validated by agent.products.m1_layout.M1Layout.from_mapping.
    m1_purse: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_production(self) -> bool:
        return self.kind is ProfileKind.PRODUCTION


def load_profile(path: Path | str) -> Profile:
    """Read and validate a profile file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigurationError(f"profile {path}: file not found") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"profile {path}: unreadable: {exc}") from exc
    return parse_profile(raw, source=str(path))


def parse_profile(raw: Mapping[str, Any], source: str = "<profile>") -> Profile:
    """Validate a profile already parsed from TOML."""
    r = _Reader(raw, source)
    kind = r.enum("profile.kind", ProfileKind)
    test_keys = tuple(r.list_of_tables("test_keys.keys", required=False))
    if kind is ProfileKind.PRODUCTION and test_keys:
        raise ConfigurationError(f"{source}: a production profile must not carry test_keys")
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
    return Profile(
        name=r.string("profile.name"),
        kind=kind,
        source=source,
        line=r.digits("terminal.line", 4),
        operator_city=r.digits("terminal.operator_city", 4),
        double_tap_window_s=r.number("terminal.double_tap_window_s", minimum=0.0),
        recovery_window_s=r.number("terminal.recovery_window_s", minimum=1.0),
        max_balance=r.integer("terminal.max_balance", minimum=1, maximum=0x7FFFFFFF),
        flat_fare=r.integer("fare.flat_fare", minimum=0, maximum=0xFFFFFFFF),
        reader=_reader_profile(r, sam_kind),
        sam_kind=sam_kind,
        sam_application=r.choice("sam.application", ("tunion", "cjt166"), default="tunion"),
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
        test_keys=test_keys,
        lock_key_index=r.integer("blacklist.lock_key_index", minimum=0, maximum=255, default=1),
        lock_permanent=r.boolean("blacklist.lock_permanent", default=False),
        m1_purse=r.table("m1_purse", required=False),
    )


def _reader_profile(r: _Reader, sam_kind: str) -> ReaderProfile:
    driver = r.choice("reader.driver", ("serial", "pcsc", "nfcpy"))
    reader = ReaderProfile(
        driver=driver,
        url=r.string("reader.url", default=""),
        baudrate=r.integer("reader.baudrate", minimum=1200, default=115200),
        timeout_s=r.number("reader.timeout_s", minimum=0.01, default=1.0),
        poll_interval_s=r.number("reader.poll_interval_s", minimum=0.001, default=0.02),
        sam_slot=r.integer("reader.sam_slot", minimum=0, maximum=15, default=1),
        framing=r.table("reader.framing", required=False),
        card_reader=r.string("reader.card_reader", default=""),
        sam_reader=r.string("reader.sam_reader", default=""),
    )
    if driver in ("serial", "nfcpy") and not reader.url:
        raise r.fail("reader.url", f"is required by driver '{driver}'", reader.url)
    if driver == "pcsc" and not reader.card_reader:
        raise r.fail("reader.card_reader", "is required by driver 'pcsc'", reader.card_reader)
    if driver != "serial" and sam_kind == "psam" and not reader.sam_reader:
        raise r.fail(
            "reader.sam_reader",
            f"is required for a PSAM with driver '{driver}' (a PC/SC contact reader)",
            reader.sam_reader,
        )
    return reader


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
            raise self.fail(dotted, f"must be in {minimum}..{maximum}", value)
        return value

    def number(self, dotted: str, *, minimum: float, default: Any = _MISSING) -> float:
        value = self.get(dotted, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(dotted, "must be a number", value)
        if value < minimum:
            raise self.fail(dotted, f"must be >= {minimum}", value)
        return float(value)

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
