"""Sans-I/O M1 (MIFARE Classic) city-card purse machine (m1-purse-and-readers.md §3).

Each card operation is a *step*: a generator that yields storage-card operations
(:class:`Authenticate`, :class:`Read`, :class:`Write`, :class:`Increment`, :class:`Decrement`,
:class:`Restore`, :class:`Transfer`) and receives their results (the 16 bytes of a
:class:`Read`, ``None`` otherwise). A failed operation is thrown into the step as the
:class:`agent.errors.AgentError` the reader seam raised. :func:`drive` is the only glue.

The purse is kept the MOHURD way (§3.1, §3.4): two value-block copies (primary P, backup B), a
public-info block in two copies (pubP, pubB) holding the record pointer, the purse transaction
counter and the process flag, and cyclic record blocks. The debit follows CARDOP's canonical
order A..F with a read-back after every write (§3.5 rule 1: never trust "no ACK"), and
:func:`classify` applies the interrupted-purchase rule table of §3.5 to any card read, so the
next tap rolls an interrupted debit back or forward to one consistent purse.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from agent import crypto
from agent.errors import AgentError, CardProtocolError, TapRefused
from agent.products.m1_codec import (
    AccessConditions,
    DataOp,
    Issuance,
    M1FormatError,
    PublicInfo,
    TripRecord,
    access_group,
    decode_access_bits,
    decode_backup,
    decode_dates_block,
    decode_issuance,
    decode_public_info,
    encode_backup,
    encode_public_info,
    encode_record,
    value_or_none,
)
from agent.products.m1_layout import (
    M1Layout,
    TacConfig,
    block_number,
    blocks_in_sector,
)
from agent.readers.storage import KeyType

T = TypeVar("T")

# --- operations --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticate:
    block: int
    key_type: KeyType
    key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Read:
    block: int


@dataclass(frozen=True, slots=True)
class Write:
    block: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Increment:
    block: int
    value: int


@dataclass(frozen=True, slots=True)
class Decrement:
    block: int
    value: int


@dataclass(frozen=True, slots=True)
class Restore:
    block: int


@dataclass(frozen=True, slots=True)
class Transfer:
    block: int


Operation = Authenticate | Read | Write | Increment | Decrement | Restore | Transfer
M1Step = Generator[Operation, bytes | None, T]


@dataclass(slots=True)
class M1Session:
    """Sector keys of one card and the sector currently authenticated."""

    keys: Mapping[int, bytes] = field(repr=False)
    key_type: KeyType = KeyType.A
    current: int | None = None

    def __repr__(self) -> str:
        sectors = sorted(self.keys)
        return f"M1Session(sectors={sectors}, key={self.key_type.name}, current={self.current})"


def drive(
    step: M1Step[T],
    execute: Callable[[Operation], bytes | None],
    session: M1Session | None = None,
) -> T:
    """Run a step, executing each operation; a failure is thrown into the step.

    A failed operation leaves the card idle, so the session forgets its authentication.
    """
    try:
        op = next(step)
        while True:
            try:
                result = execute(op)
            except AgentError as exc:
                if session is not None:
                    session.current = None
                op = step.throw(exc)
            else:
                op = step.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _ensure(session: M1Session, sector: int) -> M1Step[None]:
    if session.current == sector:
        return
    key = session.keys.get(sector)
    if key is None:
        raise CardProtocolError(f"no key for sector {sector}")  # a layout/provider bug
    yield Authenticate(block_number(sector, 0), session.key_type, key)
    session.current = sector


def _read(block: int) -> M1Step[bytes]:
    data = yield Read(block)
    if not isinstance(data, bytes) or len(data) != 16:
        raise CardProtocolError(f"read of block {block}: expected 16 bytes")
    return data


def _write_checked(block: int, data: bytes) -> M1Step[None]:
    """WRITE, then read back and compare (§3.5 rule 1)."""
    yield Write(block, data)
    back = yield from _read(block)
    if back != data:
        raise CardProtocolError(f"read-back of block {block} differs from what was written")


def _transfer_checked(first: Operation, dest: int, expected: int) -> M1Step[None]:
    """A value operation + TRANSFER, then read ``dest`` back and check the value."""
    yield first
    yield Transfer(dest)
    value = value_or_none((yield from _read(dest)))
    if value is None or value.value != expected:
        found = None if value is None else value.value
        raise CardProtocolError(f"read-back of value block {dest}: {found}, expected {expected}")


# --- reading -----------------------------------------------------------------------------------


def auth_uid(uid: bytes) -> bytes:
    """The 4 UID bytes used for authentication and diversification (§1.1)."""
    if len(uid) == 4:
        return bytes(uid)
    if len(uid) == 7:
        return bytes(uid[3:7])
    raise CardProtocolError(f"MIFARE Classic UID of {len(uid)} bytes")


def issuance_key(layout: M1Layout, uid4: bytes) -> bytes:
    """Key A of the issuance sector: UID ‖ UID[0:2] (AFC, CARDOP) or a configured key (§3.1)."""
    if layout.keys.issuance_key == "uid":
        return uid4 + uid4[:2]
    return bytes.fromhex(layout.keys.issuance_key)


def read_issuance(layout: M1Layout, uid4: bytes) -> M1Step[Issuance]:
    """Authenticate the issuance sector with its UID key and parse its block (§3.4 step 0),
    then its dates block when the layout has ``[m1_purse.validity]``.

    Dates that are not BCD or not calendar dates (or a dates block whose check fails) refuse
    the card as ``card_damaged``: the issuance sector is never written by a tap, so this is
    not a tear to recover from.
    """
    sector = layout.issuance_sector
    yield Authenticate(block_number(sector, 0), KeyType.A, issuance_key(layout, uid4))
    raw = yield from _read(block_number(sector, layout.issuance_block))
    issuance = decode_issuance(raw, layout.issuance_check)
    dates_block = layout.validity_block
    if layout.validity is not None and dates_block is not None:
        raw_dates = yield from _read(dates_block)
        try:
            dates = decode_dates_block(raw_dates, layout.validity.dates)
        except M1FormatError as exc:
            raise TapRefused("card_damaged", f"issuance sector: {exc}") from exc
        issuance = issuance.with_dates(dates)
    return issuance


def new_session(layout: M1Layout, keys: Mapping[int, bytes]) -> M1Session:
    """The session of one tap from the provider's ``{sector: key}`` for
    :meth:`M1Layout.sectors_in_use`; a missing or malformed key is a provider bug, refused here
    before any card operation."""
    for sector in layout.sectors_in_use():
        key = keys.get(sector)
        if key is None or len(key) != 6:
            raise CardProtocolError(f"no 6-byte key for sector {sector}")
    return M1Session(dict(keys), layout.keys.key_type)


# --- qualification ---------------------------------------------------------------------------

ENABLE_REFUSALS = {0x01: "not_enabled", 0x03: "stopped", 0x04: "blacklisted"}


def qualify(
    layout: M1Layout,
    issuance: Issuance,
    state: PurseState,
    today: dt.date,
    max_balance: int,
) -> None:
    """The terminal's checks of an M1 card, after recovery: enable flag (§3.1 block 0: 01 not
    enabled, 02 normal, 03 stopped, 04 blacklisted), city and card-type allow-lists, the
    validity dates (valid from the start date, else the issue date, through the expiry date
    inclusive), the public-info blacklist flag, a plausible balance.

    Raises :class:`TapRefused` (reasons ``not_enabled``, ``stopped``, ``blacklisted``,
    ``card_disabled``, ``not_accepted_city``, ``card_type``, ``not_yet_valid``, ``expired``,
    ``card_damaged``); a balance outside ``0..max_balance`` is a :class:`CardProtocolError`.
    """
    flag = issuance.enable_flag
    if flag != layout.enable_flag_normal:
        raise TapRefused(
            ENABLE_REFUSALS.get(flag, "card_disabled"), f"issuance enable flag {flag:02X}"
        )
    city = issuance.city_code.hex().upper()
    if layout.city_codes and city not in layout.city_codes:
        raise TapRefused("not_accepted_city", f"city code {city}")
    if layout.accepted_card_types and issuance.card_type not in layout.accepted_card_types:
        raise TapRefused("card_type", f"card type {issuance.card_type:02X}")
    _check_dates(layout, issuance, today)
    if state.pub_p is None or state.purse_p is None:
        raise CardProtocolError("qualify needs a consistent (recovered) purse")
    if state.pub_p.blacklist == layout.blacklist_value:
        raise TapRefused("blacklisted", "public-info blacklist flag set")
    if not 0 <= state.purse_p <= max_balance:
        raise CardProtocolError(f"M1 purse: balance {state.purse_p} outside 0..{max_balance}")


def _check_dates(layout: M1Layout, issuance: Issuance, today: dt.date) -> None:
    validity = layout.validity
    if validity is None:
        return
    configured = validity.dates.offsets()
    found = {
        "issue": issuance.issue_date,
        "start": issuance.start_date,
        "expiry": issuance.expiry_date,
    }
    if validity.unset == "refuse":
        for name in configured:
            if found[name] is None:
                raise TapRefused("card_damaged", f"issuance {name} date not set on the card")
    start = issuance.start_date or issuance.issue_date
    expiry = issuance.expiry_date
    span = f"valid {start or '-'}..{expiry or '-'}"
    if start is not None and expiry is not None and start > expiry:
        raise TapRefused("card_damaged", f"issuance dates: {span}")
    if start is not None and today < start:
        raise TapRefused("not_yet_valid", span)
    if expiry is not None and today > expiry:
        raise TapRefused("expired", span)


DIRECTORY_CODES = {"purse": 0x10, "public": 0x06, "records": 0x03, "issuance": 0x01}


def check_directory(layout: M1Layout) -> M1Step[None]:
    """Sector 0 block 1: one area code per sector (§3.1); refuse a card whose map disagrees."""
    sector = layout.directory_sector
    yield Authenticate(block_number(sector, 0), KeyType.A, layout.directory_key)
    raw = yield from _read(block_number(sector, layout.directory_block))
    wanted = {
        layout.issuance_sector: DIRECTORY_CODES["issuance"],
        layout.purse_sector: DIRECTORY_CODES["purse"],
        layout.public_sector: DIRECTORY_CODES["public"],
        **{s: DIRECTORY_CODES["records"] for s in layout.record_sectors},
    }
    for sector_no, code in wanted.items():
        if sector_no < 16 and raw[sector_no] != code:
            raise TapRefused(
                "unknown_card",
                f"directory: sector {sector_no} has area code {raw[sector_no]:02X}, not {code:02X}",
            )


@dataclass(frozen=True, slots=True)
class PurseState:
    """What one read of the purse and public-info sectors found. ``None`` = invalid copy."""

    purse_p: int | None
    purse_b: int | None
    pub_p: PublicInfo | None
    pub_b: PublicInfo | None


def _require_access(
    conditions: AccessConditions,
    sector: int,
    blocks: tuple[int, ...],
    ops: tuple[DataOp, ...],
    key: KeyType,
) -> None:
    n = blocks_in_sector(sector)
    for block in blocks:
        group = access_group(block - block_number(sector, 0), n)
        for op in ops:
            if not conditions.data_allows(group, op, key):
                raise TapRefused(
                    "access_conditions",
                    f"sector {sector} access bits forbid {op} of block {block} with key {key.name}",
                )


def _check_trailer(
    session: M1Session, sector: int, blocks: tuple[int, ...], ops: tuple[DataOp, ...]
) -> M1Step[None]:
    trailer = yield from _read(block_number(sector, blocks_in_sector(sector) - 1))
    try:
        conditions = decode_access_bits(trailer[6:9])
    except M1FormatError as exc:
        raise TapRefused("access_conditions", f"sector {sector}: {exc}") from exc
    _require_access(conditions, sector, blocks, ops, session.key_type)


def read_state(layout: M1Layout, session: M1Session) -> M1Step[PurseState]:
    """Read both purse copies and both public-info copies (and check the access bits)."""
    p_blk, b_blk = layout.purse_blocks
    yield from _ensure(session, layout.purse_sector)
    if layout.check_access_bits:
        yield from _check_trailer(
            session, layout.purse_sector, (p_blk, b_blk), ("read", "decrement")
        )
    purse_p = value_or_none((yield from _read(p_blk)))
    purse_b = value_or_none((yield from _read(b_blk)))
    pp_blk, pb_blk = layout.public_blocks
    yield from _ensure(session, layout.public_sector)
    if layout.check_access_bits:
        yield from _check_trailer(
            session, layout.public_sector, (pp_blk, pb_blk), ("read", "write")
        )
    pub_p = _public_or_none(layout, (yield from _read(pp_blk)), backup=False)
    pub_b = _public_or_none(layout, (yield from _read(pb_blk)), backup=True)
    return PurseState(
        purse_p=None if purse_p is None else purse_p.value,
        purse_b=None if purse_b is None else purse_b.value,
        pub_p=pub_p,
        pub_b=pub_b,
    )


def _public_or_none(layout: M1Layout, raw: bytes, *, backup: bool) -> PublicInfo | None:
    try:
        block = decode_backup(raw, layout.public_backup_encoding) if backup else raw
        return decode_public_info(block, layout.check, layout.check_seed)
    except M1FormatError:
        return None


def encode_public(layout: M1Layout, info: PublicInfo, *, backup: bool) -> bytes:
    block = encode_public_info(info, layout.check, layout.check_seed)
    return encode_backup(block, layout.public_backup_encoding) if backup else block


# --- the interrupted-purchase rule table (§3.5) ---------------------------------------------------


class Recovery(enum.Enum):
    """The result classes of CARDOP ``JugeErrorPoint`` (§3.5), plus two safe extensions."""

    NORMAL = "normal"
    A = "A"  # torn in step A: roll back
    BC = "B/C"  # debit done, flag not yet 02: roll forward
    B1 = "B1"  # torn inside the debit's TRANSFER: roll back
    B2 = "B2"  # flag set, debit never landed: roll back
    D = "D"  # torn while writing flag 02: roll forward
    E = "E"  # torn in step E
    F = "F"  # torn in step F
    # Not in CARDOP's table (extensions, each leaves the card as the last completed transaction):
    P_FROM_B = "P<-B"  # transaction complete, primary purse damaged: primary := backup (AFC)
    PUB_B = "pubB"  # transaction complete, public backup damaged: pubB := pubP
    FLAG = "flag"  # torn blacklist-flag write (agent.products.m1_lock): pubB := pubP
    BROKEN = "broken"  # no rule applies: refuse the card


@dataclass(frozen=True, slots=True)
class WritePublic:
    backup: bool
    info: PublicInfo


@dataclass(frozen=True, slots=True)
class CopyPurse:
    """RESTORE ``source`` + TRANSFER into the other copy (``to_backup``: P → B)."""

    to_backup: bool


RepairAction = WritePublic | CopyPurse


@dataclass(frozen=True, slots=True)
class Classification:
    """What :func:`classify` decided: the class, the repair and the consistent state after it."""

    kind: Recovery
    actions: tuple[RepairAction, ...] = ()
    balance: int | None = None
    public: PublicInfo | None = None
    reason: str = ""

    @property
    def rolled_forward(self) -> bool:
        return self.kind in (Recovery.BC, Recovery.D, Recovery.E, Recovery.F)


def _restore_public(
    layout: M1Layout, pub_b: PublicInfo
) -> tuple[PublicInfo, tuple[WritePublic, ...]]:
    target = pub_b if layout.is_done(pub_b.flag) else pub_b.with_(flag=layout.flag_done)
    actions: tuple[WritePublic, ...] = (WritePublic(False, target),)
    if target != pub_b:
        actions += (WritePublic(True, target),)
    return target, actions


def classify(state: PurseState, layout: M1Layout) -> Classification:
    """Apply the §3.5 rules in their order; the actions make the card consistent again.

    Every action sequence is ordered so that a tear inside it leaves a card that classifies
    to the same decision (roll back stays roll back, roll forward stays roll forward).
    """
    p, b, pp, pb = state.purse_p, state.purse_b, state.pub_p, state.pub_b
    if p is None and b is None:
        return Classification(Recovery.BROKEN, reason="both purse copies are invalid")
    if pp is None and pb is None:
        return Classification(Recovery.BROKEN, reason="both public-info copies are invalid")
    in_progress = pp is not None and pp.flag == layout.flag_in_progress
    done = pp is not None and layout.is_done(pp.flag)
    stepped = pp is not None and pb is not None and (pp.counter - 1) & 0xFFFF == pb.counter
    pub_equal = pp is not None and pb is not None and pp.key_fields() == pb.key_fields()
    both = p is not None and b is not None
    lower = both and p < b  # type: ignore[operator]
    equal = both and p == b

    if done and pub_equal and equal and pb is not None and layout.is_done(pb.flag):
        return Classification(Recovery.NORMAL, balance=p, public=pp)
    if equal and (pp is None or (in_progress and pb is not None and pp.counter == pb.counter)):
        assert pb is not None
        public, actions = _restore_public(layout, pb)
        return Classification(Recovery.A, actions, p, public)
    if in_progress and stepped and lower:
        assert pp is not None
        public = pp.with_(flag=layout.flag_done)
        return Classification(
            Recovery.BC,
            (WritePublic(False, public), WritePublic(True, public), CopyPurse(to_backup=True)),
            p,
            public,
        )
    if in_progress and stepped and p is None and b is not None:
        assert pb is not None
        public, actions = _restore_public(layout, pb)
        return Classification(Recovery.B1, (CopyPurse(to_backup=False), *actions), b, public)
    if in_progress and stepped and equal:
        assert pb is not None
        public, actions = _restore_public(layout, pb)
        return Classification(Recovery.B2, actions, p, public)
    if pp is None and pb is not None and lower:
        public = pb.with_(
            pointer=layout.next_pointer(pb.pointer),
            counter=(pb.counter + 1) & 0xFFFF,
            flag=layout.flag_done,
        )
        return Classification(
            Recovery.D,
            (WritePublic(False, public), WritePublic(True, public), CopyPurse(to_backup=True)),
            p,
            public,
        )
    if done and lower and (pb is None or stepped):
        assert pp is not None
        return Classification(Recovery.E, (WritePublic(True, pp), CopyPurse(to_backup=True)), p, pp)
    if done and pub_equal and p is not None and (b is None or lower):
        return Classification(Recovery.F, (CopyPurse(to_backup=True),), p, pp)
    # Extensions (not in CARDOP's table): the last transaction completed on both public copies,
    # so the one valid purse copy is the balance of record.
    if done and pub_equal and p is None and b is not None:
        return Classification(Recovery.P_FROM_B, (CopyPurse(to_backup=False),), b, pp)
    if done and pb is None and equal:
        assert pp is not None
        return Classification(Recovery.PUB_B, (WritePublic(True, pp),), p, pp)
    # A torn blacklist-flag write (§3.1 public-info byte 6; agent.products.m1_lock writes pubP,
    # then pubB): both copies valid and "done", the same counter, equal purses, only byte 6
    # differs. No debit is in flight, so no purse is touched: pubP (written first) wins.
    if done and equal and pb is not None and layout.is_done(pb.flag) and _only_flag_differs(pp, pb):
        assert pp is not None
        return Classification(Recovery.FLAG, (WritePublic(True, pp),), p, pp)
    return Classification(Recovery.BROKEN, reason=_describe(state, layout))


def _only_flag_differs(pp: PublicInfo | None, pb: PublicInfo | None) -> bool:
    """The two public copies agree on bytes 0..7 except the blacklist flag (byte 6, §3.1)."""
    if pp is None or pb is None or pp.blacklist == pb.blacklist:
        return False
    return pp.key_fields() == pb.with_(blacklist=pp.blacklist).key_fields()


def _describe(state: PurseState, layout: M1Layout) -> str:
    def pub(info: PublicInfo | None) -> str:
        return "invalid" if info is None else f"flag {info.flag:02X} counter {info.counter}"

    return (
        f"no recovery rule applies: purse P {state.purse_p}, B {state.purse_b}; "
        f"public P {pub(state.pub_p)}, B {pub(state.pub_b)}"
    )


def repair(
    layout: M1Layout, session: M1Session, classification: Classification
) -> M1Step[PurseState]:
    """Carry out a classification's actions, each verified by read-back."""
    p_blk, b_blk = layout.purse_blocks
    pp_blk, pb_blk = layout.public_blocks
    if classification.balance is None or classification.public is None:
        raise CardProtocolError(f"cannot repair a card classified {classification.kind.value}")
    for action in classification.actions:
        if isinstance(action, WritePublic):
            yield from _ensure(session, layout.public_sector)
            block = pb_blk if action.backup else pp_blk
            yield from _write_checked(
                block, encode_public(layout, action.info, backup=action.backup)
            )
        else:
            source, dest = (p_blk, b_blk) if action.to_backup else (b_blk, p_blk)
            yield from _ensure(session, layout.purse_sector)
            yield from _transfer_checked(Restore(source), dest, classification.balance)
    return PurseState(
        classification.balance,
        classification.balance,
        classification.public,
        classification.public,
    )


# --- the debit (§3.4, CARDOP canonical order) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DebitPlan:
    """Everything the debit will write, decided before the intent is journaled."""

    balance_before: int
    amount: int
    counter_before: int
    counter_after: int
    pointer: int  # the record slot written (the new pointer)
    public_before: PublicInfo
    record: bytes
    trip: bytes | None = None  # the trip block (layout.trip), written after the record

    @property
    def balance_after(self) -> int:
        return self.balance_before - self.amount


def plan_debit(
    layout: M1Layout,
    state: PurseState,
    amount: int,
    record: TripRecord,
    trip: bytes | None = None,
) -> DebitPlan:
    """The writes of one debit from a consistent (normal) card; ``trip``: the 16 bytes of the
    trip block too (a fare policy that reads the card's last trip)."""
    if trip is not None and len(trip) != 16:
        raise ValueError(f"trip block of {len(trip)} bytes")
    if state.pub_p is None or state.purse_p is None or state.purse_p != state.purse_b:
        raise CardProtocolError("a debit needs a consistent purse")
    if not 0 <= amount <= state.purse_p:
        raise ValueError(f"amount {amount} outside 0..{state.purse_p}")
    pub = state.pub_p
    return DebitPlan(
        balance_before=state.purse_p,
        amount=amount,
        counter_before=pub.counter,
        counter_after=(pub.counter + 1) & 0xFFFF,
        pointer=layout.next_pointer(pub.pointer),
        public_before=pub,
        record=encode_record(record, layout.record_layout, layout.record_money_order),
        trip=trip,
    )


def debit(layout: M1Layout, session: M1Session, plan: DebitPlan) -> M1Step[int]:
    """Steps A..F of §3.4 with read-back after each; returns the balance after."""
    p_blk, b_blk = layout.purse_blocks
    pp_blk, pb_blk = layout.public_blocks
    in_progress = plan.public_before.with_(
        pointer=plan.pointer, counter=plan.counter_after, flag=layout.flag_in_progress
    )
    done = in_progress.with_(flag=layout.flag_done)
    # A: public primary: pointer + 1, counter + 1, flag "in progress".
    yield from _ensure(session, layout.public_sector)
    yield from _write_checked(pp_blk, encode_public(layout, in_progress, backup=False))
    # B: DEC primary, TRANSFER primary, read back: old − fare.
    yield from _ensure(session, layout.purse_sector)
    yield from _transfer_checked(Decrement(p_blk, plan.amount), p_blk, plan.balance_after)
    # C: the trip record into slot [pointer].
    record_sector, record_blk = layout.record_block(plan.pointer)
    yield from _ensure(session, record_sector)
    yield from _write_checked(record_blk, plan.record)
    # C': the trip block (issue 13), before the flag says "done": a card torn from B to here
    # is rolled forward (B/C), and such a card's trip block is not trusted (read_trip's
    # caller) until the journal that holds its bytes writes it again (write_trip).
    if plan.trip is not None:
        yield from write_trip(layout, session, plan.trip)
    # D: public primary flag "done".
    yield from _ensure(session, layout.public_sector)
    yield from _write_checked(pp_blk, encode_public(layout, done, backup=False))
    # E: public primary -> backup.
    yield from _write_checked(pb_blk, encode_public(layout, done, backup=True))
    # F: purse primary -> backup (RESTORE P, TRANSFER B).
    yield from _ensure(session, layout.purse_sector)
    yield from _transfer_checked(Restore(p_blk), b_blk, plan.balance_after)
    return plan.balance_after


def read_trip(layout: M1Layout, session: M1Session) -> M1Step[bytes]:
    """The 16 bytes of the trip block (``[m1_purse.trip]``)."""
    yield from _ensure(session, layout.trip_sector)
    return (yield from _read(layout.trip_block))


def write_trip(layout: M1Layout, session: M1Session, data: bytes) -> M1Step[None]:
    """Write the trip block, verified by read-back."""
    yield from _ensure(session, layout.trip_sector)
    yield from _write_checked(layout.trip_block, data)


def check_trip_sector(layout: M1Layout, session: M1Session) -> M1Step[None]:
    """Refuse before any write if the trip block's sector forbids writing it."""
    yield from _ensure(session, layout.trip_sector)
    if layout.check_access_bits:
        yield from _check_trailer(
            session, layout.trip_sector, (layout.trip_block,), ("read", "write")
        )


def check_record_sector(layout: M1Layout, session: M1Session, pointer: int) -> M1Step[None]:
    """Refuse before any write if the record slot's sector forbids writing it."""
    sector, block = layout.record_block(pointer)
    yield from _ensure(session, sector)
    if layout.check_access_bits:
        yield from _check_trailer(session, sector, (block,), ("read", "write"))


# --- TAC input (§3.3, CARDOP 80 1A 06 00 / 80 FA 05 00) -----------------------------------------


@dataclass(frozen=True, slots=True)
class TacInput:
    amount: int
    when: tuple[int, int, int, int, int, int]  # Y, M, D, h, m, s
    counter: int
    terminal: bytes
    serial: bytes
    balance_before: int
    uid4: bytes
    city: bytes


def tac_message(config: TacConfig, data: TacInput) -> bytes:
    """The TAC's input fields in the profile's order (CARDOP: amount ‖ date ‖ time ‖ counter ‖
    terminal ‖ serial ‖ FFFF), not yet padded."""
    y, mo, d, h, mi, s = data.when
    parts = {
        "amount3": data.amount.to_bytes(3, "big"),
        "date4": crypto.bcd_encode(f"{y:04d}{mo:02d}{d:02d}"),
        "time3": crypto.bcd_encode(f"{h:02d}{mi:02d}{s:02d}"),
        "counter2": data.counter.to_bytes(2, "big"),
        "terminal6": bytes(data.terminal).rjust(6, b"\x00")[-6:],
        "serial4": bytes(data.serial),
        "ffff": b"\xff\xff",
        "balance4": data.balance_before.to_bytes(4, "big"),
        "uid4": bytes(data.uid4),
        "city2": bytes(data.city),
    }
    return b"".join(parts[name] for name in config.fields)


def tac_mac_data(config: TacConfig, message: bytes) -> bytes:
    """The data of 80 FA 05 00: [zero IV ‖] message ‖ 80 00.. (MAC padding)."""
    padded = crypto.pad80(message, 8)
    return (bytes(8) + padded) if config.prefix_iv else padded


def tac_factors(config: TacConfig, data: TacInput) -> list[bytes]:
    """The 80 1A diversifiers named by the profile (CARDOP sends none)."""
    table = {
        "serial_uid": bytes(data.serial) + bytes(data.uid4),
        "city_ff": bytes(data.city) + b"\xff" * 6,
        "uid_uid": bytes(data.uid4) + bytes(data.uid4),
    }
    return [table[name] for name in config.factors]
