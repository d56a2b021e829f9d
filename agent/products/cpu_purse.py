"""Sans-I/O CPU-card e-purse machine: PBOC e-purse, JT/T 978 (T-Union), CJ/T 166, ADF 1001 cards.

Each card operation is a *step*: a generator that yields command APDUs and receives the card's
responses (``response = yield command``), and finally returns a parsed, validated result. A step
never touches a reader, a clock or a database; :func:`drive` is the only glue, and the
transaction engine supplies the exchange function. Every answer is untrusted: a wrong length,
an unknown status word, malformed TLV or an impossible value raises a :class:`CardError`
subclass that names the command.

Command references are to ``shared/spec/cpu-purse.md``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from agent import tlv
from agent.apdu import LOCKED_SELECT_SW, Command, Party, Response, describe_sw, require
from agent.errors import CardProtocolError, ConfigurationError, TapRefused
from agent.products import cpu_logs
from agent.profile import (
    ApplicationProfile,
    CheckDigit,
    Dialect,
    Family,
    Flow,
    Management,
    NumberEncoding,
    PrintedNumber,
    Profile,
    Selection,
    TimeEncoding,
    standard_dialects,
)

T = TypeVar("T")
Step = Generator[Command, Response, T]

PPSE_NAME = b"2PAY.SYS.DDF01"
SW_FILE_NOT_FOUND = frozenset({0x6A82, 0x6A81, 0x6D00, 0x6E00, 0x6A86})


def drive(step: Step[T], exchange: Callable[[Command], Response]) -> T:
    """Run a step to completion, sending each command through ``exchange``."""
    try:
        command = next(step)
        while True:
            command = step.send(exchange(command))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _card(response: Response, command: Command, **kwargs: int) -> bytes:
    return require(response, command, Party.CARD, **kwargs)  # type: ignore[arg-type]


# --- data ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuCard:
    """What the terminal learnt from reading a purse application."""

    family: Family
    aid: bytes
    issuer_id: bytes  # EF15[0..7]: first-level diversification factor (T-Union)
    application_type: int | None  # EF15[8] (where the dialect has one)
    enable_flag: int | None  # EF15[9] (where the dialect has one)
    serial: bytes  # EF15[10..19] application serial number (8..10 bytes); the last 8: the ASN
    start: dt.date
    expiry: dt.date
    city_code: str  # T-Union EF17[6..7] / FCI DF11; CJ/T 166 and ADF 1001: EF15[2..3]
    interop_flag: int | None  # T-Union EF17[8..9]
    card_type: int | None  # T-Union EF17[10]
    balance: int
    printed_number: str = ""  # as printed on the card, derived by the dialect (issue 15)
    dialect: str = ""
    purse: int = 0x02  # GET BALANCE / INITIALIZE P2: 02 EP, 01 ED
    payment: bool = True  # the dialect's ``payment``: False refuses the tap (a campus card)
    # the issuer the printed number belongs to (issue 15: printed numbers are unique only
    # within their issuer): the dialect's ``issuer_city``, else ``city_code``
    issuer_code: str = ""

    @property
    def asn(self) -> bytes:
        return self.serial[-8:]

    @property
    def card_id(self) -> str:
        return self.serial.hex().upper()

    @property
    def factors(self) -> tuple[bytes, ...]:
        """Diversification factors as listed in PSAM 80 70 (card level first), §4.2."""
        if self.family is Family.CJT166:
            return (self.asn, bytes.fromhex(self.city_code) + bytes.fromhex("FF0000000000"))
        return (self.asn, self.issuer_id)


@dataclass(frozen=True, slots=True)
class PurchaseInit:
    """Response of INITIALIZE FOR (CAPP) PURCHASE, §3.1."""

    balance: int
    counter: int  # offline transaction sequence used by this transaction
    overdraft: int
    key_version: int
    algorithm: int
    random: bytes


@dataclass(frozen=True, slots=True)
class Debit:
    """Response of DEBIT FOR (CAPP) PURCHASE, §3.3."""

    tac: bytes
    mac2: bytes


@dataclass(frozen=True, slots=True)
class Proof:
    """Response of GET TRANSACTION PROVE, §3.6: MAC first, then TAC."""

    mac: bytes
    tac: bytes


# --- commands -----------------------------------------------------------------------------


def select_by_name(name: bytes, label: str) -> Command:
    return Command(0x00, 0xA4, 0x04, 0x00, name, le=0x00, name=f"SELECT {label}")


def select_by_fid(fid: bytes, label: str) -> Command:
    return Command(0x00, 0xA4, 0x00, 0x00, fid, le=0x00, name=f"SELECT {label}")


def read_binary_sfi(sfi: int, length: int) -> Command:
    return Command(0x00, 0xB0, 0x80 | sfi, 0x00, le=length, name=f"READ BINARY EF{sfi:02X}")


def get_balance_command() -> Command:
    return Command(0x80, 0x5C, 0x00, 0x02, le=0x04, name="GET BALANCE")


def initialize_purchase_command(
    flow: Flow, key_index: int, amount: int, terminal: bytes, purse: int = 0x02
) -> Command:
    p1 = 0x03 if flow is Flow.COMPOUND else 0x01
    data = bytes((key_index,)) + amount.to_bytes(4, "big") + terminal
    name = "INITIALIZE FOR CAPP PURCHASE" if flow is Flow.COMPOUND else "INITIALIZE FOR PURCHASE"
    return Command(0x80, 0x50, p1, purse, data, le=0x0F, name=name)


def update_capp_command(p1: int, p2: int, record: bytes) -> Command:
    return Command(0x80, 0xDC, p1, p2, record, name="UPDATE CAPP DATA CACHE")


def debit_command(ttc: int, datetime7: bytes, mac1: bytes) -> Command:
    data = ttc.to_bytes(4, "big") + datetime7 + mac1
    return Command(0x80, 0x54, 0x01, 0x00, data, le=0x08, name="DEBIT FOR PURCHASE")


def prove_command(transaction_type: int, counter: int) -> Command:
    return Command(
        0x80,
        0x5A,
        0x00,
        transaction_type,
        counter.to_bytes(2, "big"),
        le=0x08,
        name="GET TRANSACTION PROVE",
    )


# --- steps --------------------------------------------------------------------------------


class ApplicationNotFound(CardProtocolError):
    """The card does not carry this application (try the next one in the profile)."""


def select_application(app: ApplicationProfile) -> Step[bytes]:
    """Select the purse ADF the profile names; return the FCI (§2.1, §6.1 step 1).

    A locked application (SELECT answering 6283/6284/9303) raises ``TapRefused('card_locked')``.
    """
    if app.select is Selection.PPSE:
        command = select_by_name(PPSE_NAME, "PPSE")
        response = yield command
        if response.sw in SW_FILE_NOT_FOUND:
            raise ApplicationNotFound(f"{command.label}: no PPSE ({describe_sw(response.sw)})")
        fci = _card(response, command)
        aids = _ppse_aids(fci, command)
        if app.aid not in aids:
            raise ApplicationNotFound(f"{command.label}: AID {app.aid.hex().upper()} not listed")
        command = select_by_name(app.aid, f"AID {app.aid.hex().upper()}")
    elif app.select is Selection.AID:
        if app.family is Family.CJT166:
            mf = select_by_fid(b"\x3f\x00", "MF 3F00")
            response = yield mf
            if response.sw in LOCKED_SELECT_SW:
                raise TapRefused("card_locked", f"{mf.label}: SW {response.sw:04X}")
        command = select_by_name(app.aid, f"AID {app.aid.hex().upper()}")
    else:
        command = select_by_fid(b"\x10\x01", "ADF 1001")
    response = yield command
    if response.sw in LOCKED_SELECT_SW:
        raise TapRefused("card_locked", f"{command.label}: SW {response.sw:04X}")
    if response.sw in SW_FILE_NOT_FOUND:
        raise ApplicationNotFound(f"{command.label}: {describe_sw(response.sw)}")
    return _card(response, command)


def _select_again(app: ApplicationProfile) -> Command:
    """The SELECT that makes the purse application current again (after reading in the MF)."""
    if app.select is Selection.FID:
        return select_by_fid(b"\x10\x01", "ADF 1001")
    return select_by_name(app.aid, f"AID {app.aid.hex().upper()}")


def _ppse_aids(fci: bytes, command: Command) -> dict[bytes, str]:
    """AIDs (tag 4F) and labels (tag 50) of the PPSE directory entries (tag 61)."""
    try:
        nodes = tlv.parse(fci)
    except tlv.TlvError as exc:
        raise CardProtocolError(f"{command.label}: malformed FCI: {exc}") from exc
    entries: dict[bytes, str] = {}
    for node in nodes:
        for entry in node.find_all(0x61):
            aid = entry.find(0x4F)
            label = entry.find(0x50)
            if aid is not None:
                entries[aid.value] = label.value.decode("ascii", "replace") if label else ""
    return entries


@dataclass(frozen=True, slots=True)
class FciFacts:
    """What a SELECT answer says about the application (§2.2): DF name (84), label (50), the
    info-file copy (9F0C), management data (DF11, Lingnan Pass T-Union)."""

    df_name: bytes | None
    label: str
    info: bytes | None
    management: bytes | None


def parse_fci(fci: bytes) -> FciFacts:
    """The tags of an FCI; an empty answer (a card that returns only 9000) has none."""
    if not fci:
        return FciFacts(None, "", None, None)
    try:
        nodes = tlv.parse(fci)
    except tlv.TlvError as exc:
        raise CardProtocolError(f"SELECT: malformed FCI: {exc}") from exc

    def value(tag: int) -> bytes | None:
        for node in nodes:
            found = node if node.tag == tag else node.find(tag)
            if found is not None:
                return found.value
        return None

    label = value(0x50)
    return FciFacts(
        df_name=value(0x84),
        label=label.decode("ascii", "replace") if label else "",
        info=value(0x9F0C),
        management=value(0xDF11),
    )


def get_balance_for(purse: int) -> Command:
    """GET BALANCE of the EP (P2 02) or the ED (P2 01), §3.7."""
    return Command(0x80, 0x5C, 0x00, purse, le=0x04, name="GET BALANCE")


def read_card(
    app: ApplicationProfile, fci: bytes, dialects: Sequence[Dialect] | None = None
) -> Step[CpuCard]:
    """Read the card the way its issuer's dialect says (§6.1, issue 15).

    The dialect is the first of ``dialects`` (default: the §2.3 layouts) that fits the
    family and the FCI DF name, then the start of the info file (FCI tag 9F0C, else READ
    BINARY of the dialect's info file). A card whose info file says it is no transit purse (a
    highway ETC card behind ADF 1001) is refused ``not_a_transit_purse``. Then the
    management data (EF17 or FCI tag DF11), a serial file if the dialect has one, and GET
    BALANCE of the dialect's purse.
    """
    candidates = [d for d in (dialects or standard_dialects()) if d.family is app.family]
    facts = parse_fci(fci)
    candidates = [d for d in candidates if d.matches(app.family, facts.df_name, None)]
    if not candidates:
        name = facts.df_name.hex().upper() if facts.df_name else "none"
        raise TapRefused(
            "unknown_card", f"no dialect of family {app.family.value} for DF name {name}"
        )
    not_a_transit_purse(facts, None)
    info = facts.info
    if info is not None and any(d.info_sfi == 0x15 for d in candidates):
        candidates = [d for d in candidates if d.info_sfi == 0x15]  # 9F0C copies EF15 (§2.2)
    else:
        # The info file of the first candidate; a card without that file (6A82) is tried
        # with the next candidate's (Beijing keeps it in EF04, most cards in EF15).
        sfis = list(dict.fromkeys(d.info_sfi for d in candidates))
        for i, sfi in enumerate(sfis):
            length = max(d.info_length for d in candidates if d.info_sfi == sfi)
            command = read_binary_sfi(sfi, length)
            response = yield command
            if response.sw in SW_FILE_NOT_FOUND and i + 1 < len(sfis):
                continue
            info = _card(response, command, min_length=16)
            candidates = [d for d in candidates if d.info_sfi == sfi]
            break
    if info is None:  # every path above reads it or raises; kept for the type checker
        raise CardProtocolError("no info file read")
    not_a_transit_purse(facts, info)
    dialect = next((d for d in candidates if d.matches(app.family, facts.df_name, info)), None)
    if dialect is None:
        raise TapRefused(
            "unknown_card",
            f"no dialect of family {app.family.value} for an info file starting "
            f"{info[:8].hex().upper()}",
        )
    if len(info) < dialect.info_length:
        raise CardProtocolError(
            f"info file (EF{dialect.info_sfi:02X}) is {len(info)} bytes, dialect "
            f"{dialect.name} needs {dialect.info_length}"
        )
    management: bytes | None = None
    if dialect.management is Management.EF17:
        command = read_binary_sfi(0x17, app.ef17_length)
        management = _card((yield command), command, min_length=11)
    elif dialect.management is Management.FCI_DF11:
        management = facts.management
        if management is None:
            raise CardProtocolError(
                f"SELECT: dialect {dialect.name} keeps management data in FCI tag DF11, absent"
            )
    serial_file: bytes | None = None
    if dialect.serial_sfi:
        # e.g. Chongqing EF05 in the MF (§2.3 "Other files"; S9 reads it there)
        serial_file = yield from _read_extra_file(
            app, dialect.serial_sfi, dialect.serial_file_length, dialect.serial_in_mf
        )
    type_file: bytes | None = None
    where = dialect.card_type
    if where is not None and where.sfi and where.sfi != dialect.serial_sfi:
        # The issuer's card-type file (CJ/T 166 EF05, §6.1); one the dialect already read
        # for its serial is not read again (the loader ties the two to the same DF).
        type_file = yield from _read_extra_file(app, where.sfi, where.at + 1, where.in_mf)
    command = get_balance_for(dialect.purse)
    raw_balance = _card((yield command), command, length=4)
    # Readers mask the top bit of GET BALANCE (§1: S1, S9).
    balance = int.from_bytes(raw_balance, "big") & 0x7FFFFFFF
    return parse_card(
        app,
        info,
        management,
        balance,
        dialect=dialect,
        serial_file=serial_file,
        card_type_file=type_file,
    )


def _read_extra_file(app: ApplicationProfile, sfi: int, length: int, in_mf: bool) -> Step[bytes]:
    """READ BINARY of ``length`` bytes of a file beside the info file; in the MF: SELECT 3F00,
    read, then make the purse application current again."""
    if in_mf:
        command = select_by_fid(b"\x3f\x00", "MF 3F00")
        _card((yield command), command)
    command = read_binary_sfi(sfi, length)
    data = _card((yield command), command, min_length=length)
    if in_mf:
        command = _select_again(app)
        _card((yield command), command)
    return data


# Highway ETC cards name their issuer in GBK: 4 bytes of province name (云南 D4C6C4CF, ...)
# where transit purses keep BCD/hex issuer codes. Recording: vicliu624/PCSCTool README.md
# (tests/golden_cards/yunnan-etc-pcsctool.json); cpu-purse.md §11 P6 (ETC EF15, 43 bytes).
def _gbk_text(raw: bytes) -> str | None:
    """Two GB2312 hanzi (first bytes B0..F7, second A1..FE), decoded; else ``None``."""
    if len(raw) < 4 or not all(
        0xB0 <= raw[i] <= 0xF7 and 0xA1 <= raw[i + 1] <= 0xFE for i in (0, 2)
    ):
        return None
    try:
        return raw[:4].decode("gbk")
    except UnicodeDecodeError:
        return None


BANK_AID_PREFIXES = (bytes.fromhex("A000000333"),)  # UnionPay debit/credit (PBOC 3.0)


def not_a_transit_purse(facts: FciFacts, info: bytes | None) -> None:
    """Refuse, with what the card said, an application that is no transit purse (§2.1)."""
    if facts.df_name and facts.df_name.startswith(BANK_AID_PREFIXES):
        raise TapRefused(
            "not_a_transit_purse",
            f"DF name {facts.df_name.hex().upper()} is a bank application ({facts.label})",
        )
    if info is not None:
        province = _gbk_text(info[:4])
        if province is not None:
            card_type = f"{info[8]:02X}" if len(info) > 8 else "?"
            raise TapRefused(
                "not_a_transit_purse",
                f"issuer id {info[:8].hex().upper()} names {province} in GBK, card type "
                f"{card_type}, info file {len(info)} bytes: a highway ETC card",
            )


def parse_card(
    app: ApplicationProfile,
    ef15: bytes,
    ef17: bytes | None,
    balance: int,
    *,
    dialect: Dialect | None = None,
    serial_file: bytes | None = None,
    card_type_file: bytes | None = None,
) -> CpuCard:
    """Interpret the info file (EF15 or its FCI copy, §2.3) by the dialect (default: the
    standard layout of the family) and the management data (EF17 layout, first 11 bytes);
    the card type from the management data, else where the dialect's ``card_type`` says (the
    info file, the serial file, or ``card_type_file``)."""
    if dialect is None:
        dialect = next(d for d in standard_dialects() if d.family is app.family)
    if len(ef15) < dialect.info_length:
        raise CardProtocolError(
            f"EF{dialect.info_sfi:02X} is {len(ef15)} bytes, expected {dialect.info_length}"
        )
    interop: int | None = None
    card_type: int | None = None
    if dialect.management is not Management.NONE:
        where = "EF17" if dialect.management is Management.EF17 else "FCI DF11"
        if ef17 is None or len(ef17) < 11:
            raise CardProtocolError(f"{where} (management information) shorter than 11 bytes")
        city = ef17[6:8].hex().upper()
        interop = int.from_bytes(ef17[8:10], "big")
        card_type = ef17[10]
    else:
        city = ef15[dialect.city_at : dialect.city_at + 2].hex().upper()
    serial_source = ef15
    if dialect.serial_sfi:
        if serial_file is None or len(serial_file) < dialect.serial_file_length:
            raise CardProtocolError(
                f"EF{dialect.serial_sfi:02X} (serial) shorter than {dialect.serial_file_length}"
            )
        serial_source = serial_file
    serial = serial_source[dialect.serial_at : dialect.serial_at + dialect.serial_length]
    if dialect.card_type is not None:
        card_type = _card_type_byte(dialect, ef15, serial_file, card_type_file)
    rule = dialect.printed
    number_source = serial_source if rule.source_file == "serial" else ef15
    d = dialect
    return CpuCard(
        family=app.family,
        aid=app.aid,
        issuer_id=ef15[d.issuer_at : d.issuer_at + d.issuer_length],
        application_type=ef15[d.application_type_at] if d.application_type_at >= 0 else None,
        enable_flag=ef15[d.enable_flag_at] if d.enable_flag_at >= 0 else None,
        serial=serial,
        start=bcd_date(ef15[d.start_date_at : d.start_date_at + 4], "EF15 start date"),
        expiry=bcd_date(ef15[d.expiry_date_at : d.expiry_date_at + 4], "EF15 expiry date"),
        city_code=city,
        interop_flag=interop,
        card_type=card_type,
        balance=balance,
        printed_number=printed_number(rule, number_source),
        dialect=dialect.name,
        purse=dialect.purse,
        payment=dialect.payment,
        issuer_code=dialect.issuer_city or city,
    )


def _card_type_byte(
    dialect: Dialect, info: bytes, serial_file: bytes | None, type_file: bytes | None
) -> int:
    """The card type byte where the dialect keeps it (issue 13; §2.3, §6.1)."""
    where = dialect.card_type
    assert where is not None
    source: bytes | None
    if not where.sfi:
        source, name = info, f"EF{dialect.info_sfi:02X} (info)"
    elif where.sfi == dialect.serial_sfi:
        source, name = serial_file, f"EF{where.sfi:02X} (serial)"
    else:
        source, name = type_file, f"EF{where.sfi:02X}"
    if source is None or len(source) <= where.at:
        got = "not read" if source is None else f"{len(source)} bytes"
        raise CardProtocolError(
            f"{name} holds no card type at byte {where.at} (dialect {dialect.name}): {got}"
        )
    return source[where.at]


def printed_number(rule: PrintedNumber, data: bytes) -> str:
    """The number printed on the card, derived as the dialect says (never raises)."""
    raw = data[rule.at : rule.at + rule.length]
    if rule.encoding is NumberEncoding.HEX:
        digits = raw.hex().upper()
    else:
        order: Literal["big", "little"] = (
            "big" if rule.encoding is NumberEncoding.DECIMAL_BE else "little"
        )
        digits = str(int.from_bytes(raw, order))
    digits = digits[rule.drop_digits :] or "0"
    if rule.check_digit is CheckDigit.DIGIT_SUM_10 and digits.isdigit():
        check = (10 - sum(int(c) for c in digits) % 10) % 10
        digits = f"{digits}({check})"
    return digits


def bcd_date(raw: bytes, what: str) -> dt.date:
    """A 4-byte BCD YYYYMMDD date; impossible or non-BCD dates are a card protocol error."""
    text = raw.hex()
    if not text.isdigit():
        raise CardProtocolError(f"{what} {raw.hex().upper()} is not BCD")
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError as exc:
        raise CardProtocolError(f"{what} {text} is not a date") from exc


def initialize_purchase(
    flow: Flow,
    key_index: int,
    amount: int,
    terminal: bytes,
    max_balance: int,
    purse: int = 0x02,
) -> Step[PurchaseInit]:
    """INITIALIZE FOR (CAPP) PURCHASE of the EP (P2 02) or ED (P2 01), §3.1. 9401 becomes
    ``TapRefused('insufficient_balance')``."""
    command = initialize_purchase_command(flow, key_index, amount, terminal, purse)
    response = yield command
    if response.sw == 0x9401:
        raise TapRefused("insufficient_balance", "card answered 9401")
    data = _card(response, command, length=15)
    init = PurchaseInit(
        balance=int.from_bytes(data[0:4], "big"),
        counter=int.from_bytes(data[4:6], "big"),
        overdraft=int.from_bytes(data[6:9], "big"),
        key_version=data[9],
        algorithm=data[10],
        random=data[11:15],
    )
    if init.algorithm not in (0x00, 0x04):
        raise CardProtocolError(f"{command.label}: unknown algorithm id {init.algorithm:02X}")
    if init.balance > max_balance:
        raise CardProtocolError(
            f"{command.label}: balance {init.balance} above the plausible maximum {max_balance}"
        )
    return init


def update_capp_cache(p1: int, p2: int, record: bytes) -> Step[None]:
    """UPDATE CAPP DATA CACHE (80 DC), §2.4 / §3.2."""
    command = update_capp_command(p1, p2, record)
    _card((yield command), command, length=0)


def debit_for_purchase(ttc: int, datetime7: bytes, mac1: bytes) -> Step[Debit]:
    """DEBIT FOR (CAPP) PURCHASE, §3.3: answer TAC ‖ MAC2."""
    command = debit_command(ttc, datetime7, mac1)
    data = _card((yield command), command, length=8)
    return Debit(tac=data[0:4], mac2=data[4:8])


def get_transaction_prove(transaction_type: int, counter: int) -> Step[Proof]:
    """GET TRANSACTION PROVE, §3.6: data = the card's current counter; answer MAC ‖ TAC."""
    command = prove_command(transaction_type, counter)
    data = _card((yield command), command, length=8)
    return Proof(mac=data[0:4], tac=data[4:8])


def get_security_code() -> Step[bytes]:
    """GET MESSAGE (80 CA 00 00 09): the CJ/T 166 security identification code, §3.8."""
    command = Command(0x80, 0xCA, 0x00, 0x00, le=0x09, name="GET MESSAGE")
    return _card((yield command), command, length=9)


# --- qualification ------------------------------------------------------------------------


def qualify(card: CpuCard, profile: Profile, today: dt.date) -> None:
    """Terminal checks of §6.1 / §9; raises :class:`TapRefused` with a stable reason."""
    if not card.payment:
        raise TapRefused(
            "not_a_transit_purse", f"dialect {card.dialect} is read-only (payment = false)"
        )
    if card.family is Family.TUNION:
        if card.application_type is not None and card.application_type != 0x02:
            raise TapRefused("not_a_purse", f"EF15 application type {card.application_type:02X}")
        if card.enable_flag is not None and card.enable_flag != 0x01:
            raise TapRefused("not_enabled", f"EF15 enable flag {card.enable_flag:02X}")
    local = card.city_code == profile.operator_city
    if card.family is Family.CJT166 and card.application_type == 0x00 and not local:
        raise TapRefused("not_interoperable", f"city {card.city_code}, EF15[8] = 00")
    if not card.start <= today <= card.expiry:
        reason = "not_yet_valid" if today < card.start else "expired"
        raise TapRefused(reason, f"valid {card.start}..{card.expiry}")
    if card.family is Family.TUNION and not local and card.interop_flag != 0x0001:
        raise TapRefused("not_interoperable", f"EF17 interop flag {card.interop_flag:04X}")
    if card.card_type is not None and card.card_type not in profile.accepted_card_types:
        raise TapRefused("card_type_refused", f"card catalogue {card.card_type}")
    issuer = card.issuer_id.hex().upper()
    if not any(
        issuer.startswith(entry) or card.city_code == entry for entry in profile.issuer_allow_list
    ):
        raise TapRefused("issuer_not_accepted", f"issuer {issuer}, city {card.city_code}")


# --- CAPP records -------------------------------------------------------------------------


def dialect_of(card: CpuCard, profile: Profile) -> Dialect:
    """The dialect a card was read with (by name), else its family's standard layout."""
    for dialect in (*profile.dialects, *standard_dialects()):
        if dialect.name == card.dialect and dialect.family is card.family:
            return dialect
    return next(d for d in standard_dialects() if d.family is card.family)


def capp_update_for(
    card: CpuCard,
    profile: Profile,
    *,
    terminal: bytes,
    amount: int,
    balance_after: int,
    datetime7: bytes,
    industry: int,
    line: int | None = None,
    station: int | None = None,
    record_type: int = 0,
    transfer_from: int | None = None,
) -> tuple[int, int, bytes]:
    """P1, P2 and record of the UPDATE CAPP DATA CACHE a compound purchase sends (§2.4): the
    trip record of the card's dialect (:class:`TripLayout`: T-Union EF1E, CJ/T 166 CAPP EF17)
    filled from the terminal's parameters (line, station, vehicle, institution code); ``line``
    and ``station``, when given, are the validator's current position (the fare policy's);
    ``record_type`` (non-zero) the fare policy's boarding or alighting type; ``transfer_from``
    a boarding's transfer origin, for a layout that keeps one (``TripLayout.transfer_at``)."""
    layout = dialect_of(card, profile).trips
    if layout is None:
        raise ConfigurationError(
            f"{profile.source}: compound flow needs a CAPP file; dialect {card.dialect or '-'} "
            f"of {card.family.value} has no trip layout"
        )
    trip = cpu_logs.Trip(
        record_type=record_type or layout.record_type,
        terminal=terminal.hex(),
        industry=industry,
        line=int(profile.line) if line is None else line,
        station=profile.station if station is None else station,
        vehicle=profile.vehicle,
        amount=amount,
        balance=balance_after,
        when=cpu_logs.decode_time(datetime7, TimeEncoding.BCD, "terminal date-time"),
        city=profile.operator_city,
        institution=(profile.institution or bytes.fromhex(profile.operator_city)).hex(),
        transfer_from=transfer_from,
    )
    return layout.write_p1, layout.write_p2, cpu_logs.build_trip(layout, trip)
