"""A stateful CPU-card e-purse simulator with real cryptography (cpu-purse.md §7).

One purse application per card (T-Union ADF, CJ/T 166 ADF or legacy DF 1001). State that a real
card keeps in EEPROM (balance, counters, files, keys, lock, last proofs) survives leaving the field;
RAM state (selection, pending transaction, challenge) is lost on :meth:`SimulatedCpuCard.power_on`.

Card keys are derived from the masters of a :class:`agent.sam.keys.KeySet` exactly as the PSAM
does (§5.4): a master with N levels is diversified by the first N of the card's factors, listed card
level first — T-Union ``(ASN, EF15[0..7])``, CJ/T 166 ``(ASN, city || FF0000000000)``, legacy 1001
``(ASN,)`` unless configured.

Timing model (``modelled_seconds``), ISO-DEP at 106 kbit/s: every APDU costs 2 ms of frame and
turnaround overhead plus 0.1 ms per byte on the air (command + response); a committed DEBIT or
CREDIT adds 12 ms of EEPROM writing, an UPDATE CAPP DATA CACHE 3 ms (RAM staging) and an
APPLICATION BLOCK 6 ms.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import structlog

from agent import crypto
from agent.apdu import Command
from agent.crypto import Algorithm
from agent.sam.keys import KeySet, MasterKey
from tests.fake_reader.faults import CardTorn, FaultSchedule, corrupt

log = structlog.get_logger(__name__)

Family = Literal["tunion", "cjt166", "legacy1001"]
LockState = Literal["none", "temporary", "permanent"]
RandomSource = Callable[[int], bytes]

TUNION_AID = bytes.fromhex("A000000632010105")  # §2.1
CJT166_AID = bytes.fromhex("A00000000386980701")  # §2.1
PPSE_NAME = b"2PAY.SYS.DDF01"
PSE_NAME = b"1PAY.SYS.DDF01"
TUNION_LABEL = b"MOT_T_EP"
MF_FID = bytes.fromhex("3F00")
LEGACY_FID = bytes.fromhex("1001")
CJT166_FIDS = (bytes.fromhex("3F01"), bytes.fromhex("1001"))
DEFAULT_ATS = bytes.fromhex("0B78807002" + "8073C8211000")
DEFAULT_ASN = bytes.fromhex("5170070104791381")  # §5.8 transcript

# Timing model (see module docstring), in seconds.
AIR_OVERHEAD_S = 0.002
AIR_PER_BYTE_S = 0.0001
EEPROM_COMMIT_S = 0.012
CAPP_STAGE_S = 0.003
BLOCK_WRITE_S = 0.006

PURCHASE_TYPE = {0x01: 0x06, 0x03: 0x09}  # INIT P1 -> transaction type (§3.1, §3.10)
LOAD_TYPE = 0x02
MAX_COUNTER = 0xFFFF

SW_OK = b"\x90\x00"


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


def _tlv(tag: int, value: bytes) -> bytes:
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    length = bytes((len(value),)) if len(value) < 0x80 else bytes((0x81, len(value)))
    return tag_bytes + length + value


class CardKey(NamedTuple):
    """One entry of the card's key table (§7): version, algorithm id and the diversified key."""

    version: int
    algorithm: Algorithm
    key: bytes

    def __repr__(self) -> str:
        return f"CardKey(version={self.version}, algorithm={self.algorithm.name}, key=<redacted>)"


class DebitRecord(NamedTuple):
    counter: int  # offline counter used by the transaction (before the increment)
    amount: int
    transaction_type: int
    ttc: int
    tac: bytes


class LoadRecord(NamedTuple):
    online_counter: int  # before the increment
    amount: int
    tac: bytes


class Proof(NamedTuple):
    """last-proof table entry (§7): counter after the transaction, MAC (MAC2), TAC."""

    counter_after: int
    mac: bytes
    tac: bytes


class RecordFile:
    """A record EF. ``cyclic``: fixed-size records, record 1 newest (§2.3 EF18/EF1E).
    ``capp``: PBOC CAPP records ``[...][id][len][lock flag][data]`` addressed by identifier; the
    identifier sits at ``id_offset`` and the length byte right after it (§2.4)."""

    def __init__(
        self,
        kind: Literal["cyclic", "capp"],
        *,
        record_size: int | None = None,
        max_records: int = 10,
        records: Sequence[bytes] = (),
        id_offset: int = 0,
    ) -> None:
        self.kind = kind
        self.record_size = record_size
        self.max_records = max_records
        self.id_offset = id_offset
        self.records: list[bytes] = [bytes(r) for r in records]

    def by_number(self, number: int) -> bytes | None:
        if 1 <= number <= len(self.records):
            return self.records[number - 1]
        return None

    def index_of_id(self, identifier: int) -> int | None:
        for i, record in enumerate(self.records):
            if len(record) > self.id_offset and record[self.id_offset] == identifier:
                return i
        return None

    def append(self, record: bytes) -> None:
        self.records.insert(0, bytes(record))
        del self.records[self.max_records :]


@dataclass
class _Pending:
    """An open INITIALIZE FOR (CAPP) PURCHASE or INITIALIZE FOR LOAD (§7)."""

    kind: Literal["purchase", "load"]
    transaction_type: int
    amount: int
    terminal: bytes
    key: CardKey
    random: bytes
    counter: int
    capp: bool = False
    staged: list[tuple[int, int | None, bytes]] = field(default_factory=list)  # sfi, index, data


def _default_random() -> RandomSource:
    return os.urandom


class SimulatedCpuCard:
    """An ISO-DEP purse card answering APDUs per cpu-purse.md §3 and §7.

    Use the factories :func:`make_tunion_card`, :func:`make_cjt166_card`,
    :func:`make_legacy_1001_card`. :meth:`process` never raises anything but :class:`CardTorn`.
    """

    def __init__(
        self,
        *,
        family: Family,
        uid: bytes,
        ats: bytes,
        adf_name: bytes,
        adf_fids: Sequence[bytes],
        fci: bytes,
        binaries: dict[int, bytes],
        record_files: dict[int, RecordFile],
        keys: dict[tuple[str, int], CardKey],
        balance: int,
        overdraft: int = 0,
        offline_counter: int = 0,
        online_counter: int = 0,
        lock: LockState = "none",
        random_source: RandomSource | None = None,
        security_code: bytes | None = None,
        max_balance: int = 0x7FFFFFFF,
        sm4_session_key: str = "pad80",
        sm4_load_session_key: str = "pad80",
        fci_when_locked: bool = False,
        ef18_counter_after: bool = False,
        prove_accepts_counter_before: bool = False,
        ppse: bool = False,
    ) -> None:
        self.family = family
        self.uid = bytes(uid)
        self.ats = bytes(ats)
        self.adf_name = bytes(adf_name)
        self.adf_fids = tuple(bytes(f) for f in adf_fids)
        self.fci = bytes(fci)
        self.binaries = {sfi: bytes(v) for sfi, v in binaries.items()}
        self.record_files = record_files
        self.keys = dict(keys)
        self._balance = balance
        self.overdraft = overdraft
        self._offline_counter = offline_counter
        self._online_counter = online_counter
        self._lock: LockState = lock
        self.random_source = random_source or _default_random()
        self.security_code = security_code
        self.max_balance = max_balance
        self.sm4_session_key = sm4_session_key
        self.sm4_load_session_key = sm4_load_session_key
        self.fci_when_locked = fci_when_locked
        self.ef18_counter_after = ef18_counter_after
        self.prove_accepts_counter_before = prove_accepts_counter_before
        self.ppse = ppse

        self.faults = FaultSchedule()
        self.modelled_seconds = 0.0
        self.internal_errors: list[BaseException] = []
        self.last_proof: dict[int, Proof] = {}
        self._debits: list[DebitRecord] = []
        self._loads: list[LoadRecord] = []
        self._command_count = 0
        self._handlers: dict[tuple[int, int], Callable[[Command], bytes]] = {
            (0x00, 0xA4): self._select,
            (0x00, 0xB0): self._read_binary,
            (0x00, 0xB2): self._read_record,
            (0x00, 0x84): self._get_challenge,
            (0x80, 0x50): self._initialize,
            (0x80, 0xDC): self._update_capp,
            (0x80, 0x54): self._debit,
            (0x80, 0x52): self._credit_for_load,
            (0x80, 0x5A): self._get_transaction_prove,
            (0x80, 0x5C): self._get_balance,
            (0x84, 0x1E): self._application_block,
            (0x80, 0xCA): self._get_message,
        }
        self.power_on()

    # -- read-only views for tests ----------------------------------------------------------------

    @property
    def balance(self) -> int:
        return self._balance

    @property
    def offline_counter(self) -> int:
        return self._offline_counter

    @property
    def online_counter(self) -> int:
        return self._online_counter

    @property
    def lock_state(self) -> LockState:
        return self._lock

    @property
    def debits(self) -> list[DebitRecord]:
        return list(self._debits)

    @property
    def loads(self) -> list[LoadRecord]:
        return list(self._loads)

    @property
    def asn(self) -> bytes:
        return self.binaries[0x15][12:20]

    @property
    def has_pending_transaction(self) -> bool:
        return self._pending is not None

    @property
    def command_count(self) -> int:
        return self._command_count

    def records(self, sfi: int) -> list[bytes]:
        """Records of a record EF, record 1 first (newest first for cyclic files)."""
        return list(self.record_files[sfi].records)

    def __repr__(self) -> str:
        return (
            f"SimulatedCpuCard({self.family}, asn={self.asn.hex().upper()}, "
            f"balance={self._balance}, counter={self._offline_counter}, lock={self._lock})"
        )

    # -- field / fault control ---------------------------------------------------------------------

    def power_on(self) -> None:
        """The card entered the field: RAM state is reset."""
        self._selected: Literal["none", "mf", "ppse", "adf"] = "none"
        self._pending: _Pending | None = None
        self._challenge: bytes | None = None
        self._mute = False

    def reset_command_count(self) -> None:
        self._command_count = 0

    # -- APDU entry point --------------------------------------------------------------------------

    def process(self, apdu: bytes) -> bytes:
        """Answer one command APDU (data + SW). Raises only :class:`CardTorn`."""
        self._command_count += 1
        fault = self.faults.pop(self._command_count)
        raw = bytes(apdu)
        if self._mute or (fault is not None and fault.kind in ("tear_before", "mute")):
            if fault is not None and fault.kind == "mute":
                self._mute = True
            self.modelled_seconds += AIR_OVERHEAD_S + AIR_PER_BYTE_S * len(raw)
            raise CardTorn(f"card left the field before command {self._command_count}")
        self._work_s = 0.0
        try:
            response = self._dispatch(raw)
        except Exception as exc:  # a simulator bug must not look like a tear
            self.internal_errors.append(exc)
            log.exception("cpu_card.internal_error", apdu=raw.hex().upper())
            response = _sw(0x6F00)
        self.modelled_seconds += (
            AIR_OVERHEAD_S + AIR_PER_BYTE_S * (len(raw) + len(response)) + self._work_s
        )
        if fault is not None and fault.kind == "tear_after":
            raise CardTorn(f"card left the field after command {self._command_count}")
        if fault is not None and fault.kind == "corrupt_response":
            response = corrupt(response)
        return response

    def _dispatch(self, raw: bytes) -> bytes:
        try:
            cmd = Command.from_bytes(raw)
        except ValueError:
            self._pending = None
            return _sw(0x6700)
        handler = self._handlers.get((cmd.cla, cmd.ins))
        if not self._keeps_pending(cmd):
            self._pending = None  # any other command cancels the transaction (§7, L)
        if handler is None:
            if cmd.cla not in (0x00, 0x80, 0x84):
                return _sw(0x6E00)
            return _sw(0x6D00)
        return handler(cmd)

    def _keeps_pending(self, cmd: Command) -> bool:
        key = (cmd.cla, cmd.ins)
        if key in ((0x00, 0xB0), (0x00, 0xB2), (0x80, 0x5C)):
            return True
        pending = self._pending
        if pending is None:
            return False
        if pending.kind == "purchase":
            return key == (0x80, 0x54) or (key == (0x80, 0xDC) and pending.capp)
        return key == (0x80, 0x52)

    # -- SELECT (§2.1, §2.2) -----------------------------------------------------------------------

    def _select(self, cmd: Command) -> bytes:
        if cmd.p2 not in (0x00, 0x0C):
            return _sw(0x6A86)
        if not cmd.data:
            return _sw(0x6700)
        want_fci = cmd.p2 == 0x00
        if cmd.p1 == 0x04:
            name = cmd.data
            if self.ppse and name == PPSE_NAME:
                self._selected = "ppse"
                return (self._ppse_fci() if want_fci else b"") + SW_OK
            if name == self.adf_name and self.adf_name:
                return self._select_adf(want_fci)
            if self.family == "cjt166" and name == PSE_NAME:
                self._selected = "mf"
                return (self._mf_fci() if want_fci else b"") + SW_OK
            return _sw(0x6A82)
        if cmd.p1 == 0x00:
            if len(cmd.data) != 2:
                return _sw(0x6700)
            if cmd.data == MF_FID:
                self._selected = "mf"
                return (self._mf_fci() if want_fci else b"") + SW_OK
            if cmd.data in self.adf_fids:
                return self._select_adf(want_fci)
            return _sw(0x6A82)
        return _sw(0x6A86)

    def _select_adf(self, want_fci: bool) -> bytes:
        if self._lock == "permanent":
            self._selected = "none"
            return _sw(0x9303)
        self._selected = "adf"
        if self._lock == "temporary":
            # 6283 "selected file invalidated"; whether the FCI comes too is L (§7).
            return (self.fci if self.fci_when_locked and want_fci else b"") + _sw(0x6283)
        return (self.fci if want_fci else b"") + SW_OK

    def _ppse_fci(self) -> bytes:
        entry = _tlv(0x4F, self.adf_name) + _tlv(0x50, TUNION_LABEL) + _tlv(0x87, b"\x01")
        return _tlv(0x6F, _tlv(0x84, PPSE_NAME) + _tlv(0xA5, _tlv(0xBF0C, _tlv(0x61, entry))))

    @staticmethod
    def _mf_fci() -> bytes:
        return _tlv(0x6F, _tlv(0x84, PSE_NAME))

    # -- READ BINARY / READ RECORD (§2.3, §3.9) ----------------------------------------------------

    def _read_binary(self, cmd: Command) -> bytes:
        if cmd.data:
            return _sw(0x6700)
        if not cmd.p1 & 0x80:
            return _sw(0x6986)  # no current EF: only SFI addressing is modelled
        sfi = cmd.p1 & 0x1F
        if self._selected != "adf":
            return _sw(0x6A82)
        if sfi in self.record_files:
            return _sw(0x6981)
        content = self.binaries.get(sfi)
        if content is None:
            return _sw(0x6A82)
        offset = cmd.p2
        if offset > len(content):
            return _sw(0x6B00)
        rest = content[offset:]
        if cmd.le is None or cmd.le == 256:
            return rest[:256] + SW_OK
        if cmd.le > len(rest):
            return _sw(0x6C00 | len(rest))
        return rest[: cmd.le] + SW_OK

    def _read_record(self, cmd: Command) -> bytes:
        if cmd.data:
            return _sw(0x6700)
        sfi, mode = cmd.p2 >> 3, cmd.p2 & 0x07
        if sfi == 0:
            return _sw(0x6986)
        if mode not in (0x00, 0x04):
            return _sw(0x6A86)
        if self._selected != "adf":
            return _sw(0x6A82)
        if sfi in self.binaries:
            return _sw(0x6981)
        rf = self.record_files.get(sfi)
        if rf is None:
            return _sw(0x6A82)
        if mode == 0x04:
            record = rf.by_number(cmd.p1)
        else:
            index = rf.index_of_id(cmd.p1)
            record = None if index is None else rf.records[index]
        if record is None:
            return _sw(0x6A83)
        if cmd.le is not None and cmd.le not in (256, len(record)):
            return _sw(0x6C00 | len(record))
        return record + SW_OK

    # -- GET CHALLENGE / APPLICATION BLOCK (§3.8, §6.6) --------------------------------------------

    def _get_challenge(self, cmd: Command) -> bytes:
        if cmd.p1 or cmd.p2:
            return _sw(0x6A86)
        if cmd.data or cmd.le not in (4, 8):
            return _sw(0x6700)
        self._challenge = self._random(cmd.le)
        return self._challenge + SW_OK

    def _application_block(self, cmd: Command) -> bytes:
        challenge, self._challenge = self._challenge, None  # single use
        if cmd.p1 != 0x00 or cmd.p2 not in (0x00, 0x01):
            return _sw(0x6A86)
        if len(cmd.data) != 4:
            return _sw(0x6700)
        if self._selected != "adf":
            return _sw(0x6985)
        if challenge is None:
            return _sw(0x6984)
        damk = self._key_of_usage("maintenance")
        if damk is None:
            return _sw(0x6A88)
        # MAC over the header 84 1E P1 P2 04, IV = challenge[0..3] || 00000000 (§5.7).
        header = bytes((cmd.cla, cmd.ins, cmd.p1, cmd.p2, 0x04))
        if damk.algorithm == Algorithm.SM4:
            expected = crypto.sm4_mac(damk.key, header, challenge[:4] + bytes(12))
        else:
            expected = crypto.retail_mac(damk.key, header, challenge[:4] + bytes(4))
        if not hmac.compare_digest(expected, cmd.data):
            return _sw(0x6988)
        self._lock = "temporary" if cmd.p2 == 0x00 else "permanent"  # P2 semantics: L (§3.8)
        self._work_s += BLOCK_WRITE_S
        return SW_OK

    # -- INITIALIZE FOR PURCHASE / CAPP PURCHASE / LOAD (§3.1, §3.4) -------------------------------

    def _initialize(self, cmd: Command) -> bytes:
        if cmd.p1 not in (0x00, 0x01, 0x03) or cmd.p2 != 0x02:
            return _sw(0x6A86)  # only the EP (P2 02) is modelled
        if len(cmd.data) != 0x0B:
            return _sw(0x6700)
        if self._selected != "adf" or self._lock != "none":
            return _sw(0x6985)
        key_index = cmd.data[0]
        amount = int.from_bytes(cmd.data[1:5], "big")
        terminal = cmd.data[5:11]
        if cmd.p1 == 0x00:
            return self._init_for_load(key_index, amount, terminal)
        key = self.keys.get(("purchase", key_index))
        if key is None:
            return _sw(0x9403)
        if amount > self._balance:
            return _sw(0x9401)
        if self._offline_counter >= MAX_COUNTER:
            return _sw(0x9402)  # UNCONFIRMED (§10 item 8)
        random4 = self._random(4)
        self._pending = _Pending(
            kind="purchase",
            transaction_type=PURCHASE_TYPE[cmd.p1],
            amount=amount,
            terminal=terminal,
            key=key,
            random=random4,
            counter=self._offline_counter,
            capp=cmd.p1 == 0x03,
        )
        return (
            self._balance.to_bytes(4, "big")
            + self._offline_counter.to_bytes(2, "big")
            + self.overdraft.to_bytes(3, "big")
            + bytes((key.version, key.algorithm))
            + random4
            + SW_OK
        )

    def _init_for_load(self, key_index: int, amount: int, terminal: bytes) -> bytes:
        key = self.keys.get(("load", key_index))
        if key is None:
            return _sw(0x9403)
        if self._online_counter >= MAX_COUNTER:
            return _sw(0x9402)
        random4 = self._random(4)
        alg = Algorithm(key.algorithm)
        seslk = crypto.load_session_key(
            key.key, random4, self._online_counter, alg, sm4_variant=self.sm4_load_session_key
        )
        mac1 = crypto.load_mac1(seslk, self._balance, amount, LOAD_TYPE, terminal, alg)
        self._pending = _Pending(
            kind="load",
            transaction_type=LOAD_TYPE,
            amount=amount,
            terminal=terminal,
            key=key,
            random=random4,
            counter=self._online_counter,
        )
        return (
            self._balance.to_bytes(4, "big")
            + self._online_counter.to_bytes(2, "big")
            + bytes((key.version, key.algorithm))
            + random4
            + mac1
            + SW_OK
        )

    # -- UPDATE CAPP DATA CACHE (§2.4, §3.2) -------------------------------------------------------

    def _update_capp(self, cmd: Command) -> bytes:
        pending = self._pending
        if pending is None or not pending.capp:
            return _sw(0x6985)
        if not cmd.data:
            return _sw(0x6700)
        sfi, mode = cmd.p2 >> 3, cmd.p2 & 0x07
        rf = self.record_files.get(sfi)
        if rf is None:
            return _sw(0x6A82)
        data = cmd.data
        if rf.kind == "cyclic":
            # P1=00 on a cyclic file appends a newest record, mode 000 (S2, S3) or 011 (S6).
            if cmd.p1 != 0x00 or mode not in (0x00, 0x03):
                return _sw(0x6A86)
            if len(data) != rf.record_size:
                return _sw(0x6700)
            pending.staged.append((sfi, None, data))
        else:
            if mode != 0x00:
                return _sw(0x6A86)
            index = rf.index_of_id(cmd.p1)
            if index is None:
                return _sw(0x6A83)
            if len(data) != len(rf.records[index]):
                return _sw(0x6700)
            at = rf.id_offset
            if data[at] != cmd.p1 or data[at + 1] + at + 2 != len(data):
                return _sw(0x6A80)  # record identifier / length byte do not match
            pending.staged.append((sfi, index, data))
        self._work_s += CAPP_STAGE_S
        return SW_OK

    # -- DEBIT FOR (CAPP) PURCHASE (§3.3, §7) ------------------------------------------------------

    def _debit(self, cmd: Command) -> bytes:
        pending, self._pending = self._pending, None
        if cmd.p1 != 0x01 or cmd.p2 != 0x00:
            return _sw(0x6A86)
        if len(cmd.data) != 0x0F:
            return _sw(0x6700)
        if pending is None or pending.kind != "purchase":
            return _sw(0x6985)
        ttc = int.from_bytes(cmd.data[0:4], "big")
        when = cmd.data[4:11]
        mac1 = cmd.data[11:15]
        key = pending.key
        sespk = self._session_key(key.algorithm)(key.key, pending.random, pending.counter, ttc)
        expected = crypto.purchase_mac1(
            sespk, pending.amount, pending.transaction_type, pending.terminal, when, key.algorithm
        )
        if not hmac.compare_digest(expected, mac1):
            return _sw(0x9302)
        mac2 = crypto.purchase_mac2(sespk, pending.amount, key.algorithm)
        dtk = self._key_of_usage("tac")
        tac = (
            bytes(4)
            if dtk is None
            else crypto.purchase_tac(
                dtk.key,
                pending.amount,
                pending.transaction_type,
                pending.terminal,
                ttc,
                when,
                dtk.algorithm,
            )
        )
        # Commit atomically: balance, counter, EF18, staged CAPP writes, last proof.
        self._balance -= pending.amount
        self._offline_counter += 1
        self._append_ef18(
            self._offline_counter if self.ef18_counter_after else pending.counter,
            pending.amount,
            pending.transaction_type,
            pending.terminal,
            when,
        )
        for sfi, index, data in pending.staged:
            rf = self.record_files[sfi]
            if index is None:
                rf.append(data)
            else:
                rf.records[index] = data
        self.last_proof[pending.transaction_type] = Proof(self._offline_counter, mac2, tac)
        self._debits.append(
            DebitRecord(pending.counter, pending.amount, pending.transaction_type, ttc, tac)
        )
        self._work_s += EEPROM_COMMIT_S
        return tac + mac2 + SW_OK

    # -- CREDIT FOR LOAD (§3.5, §7) ----------------------------------------------------------------

    def _credit_for_load(self, cmd: Command) -> bytes:
        pending, self._pending = self._pending, None
        if cmd.p1 or cmd.p2:
            return _sw(0x6A86)
        if len(cmd.data) != 0x0B:
            return _sw(0x6700)
        if pending is None or pending.kind != "load":
            return _sw(0x6985)
        when, mac2 = cmd.data[0:7], cmd.data[7:11]
        alg = Algorithm(pending.key.algorithm)
        seslk = crypto.load_session_key(
            pending.key.key,
            pending.random,
            pending.counter,
            alg,
            sm4_variant=self.sm4_load_session_key,
        )
        expected = crypto.load_mac2(seslk, pending.amount, LOAD_TYPE, pending.terminal, when, alg)
        if not hmac.compare_digest(expected, mac2):
            return _sw(0x9302)
        new_balance = self._balance + pending.amount
        if new_balance > self.max_balance:
            return _sw(0x9402)  # UNCONFIRMED (§7, §10 item 8)
        dtk = self._key_of_usage("tac")
        tac = (
            bytes(4)
            if dtk is None
            else crypto.load_tac(
                dtk.key,
                new_balance,
                pending.counter,
                pending.amount,
                LOAD_TYPE,
                pending.terminal,
                when,
                algorithm=Algorithm(dtk.algorithm),
            )
        )
        self._balance = new_balance
        self._online_counter += 1
        self._append_ef18(
            self._online_counter if self.ef18_counter_after else pending.counter,
            pending.amount,
            LOAD_TYPE,
            pending.terminal,
            when,
        )
        self.last_proof[LOAD_TYPE] = Proof(self._online_counter, mac2, tac)
        self._loads.append(LoadRecord(pending.counter, pending.amount, tac))
        self._work_s += EEPROM_COMMIT_S
        return tac + SW_OK

    # -- GET TRANSACTION PROVE (§3.6), GET BALANCE (§3.7), GET MESSAGE (§3.8) ----------------------

    def _get_transaction_prove(self, cmd: Command) -> bytes:
        if cmd.p1 != 0x00:
            return _sw(0x6A86)
        if len(cmd.data) != 2:
            return _sw(0x6700)
        if self._selected != "adf":
            return _sw(0x6985)
        proof = self.last_proof.get(cmd.p2)
        counter = int.from_bytes(cmd.data, "big")
        current = self._online_counter if cmd.p2 == LOAD_TYPE else self._offline_counter
        if proof is None or proof.counter_after != current:
            return _sw(0x9406)
        accepted = {proof.counter_after}
        if self.prove_accepts_counter_before:
            accepted.add(proof.counter_after - 1)
        if counter not in accepted:
            return _sw(0x9406)  # L (§3.6, §10 item 4)
        return proof.mac + proof.tac + SW_OK

    def _get_balance(self, cmd: Command) -> bytes:
        if cmd.data:
            return _sw(0x6700)
        if cmd.p1 > 0x03 or cmd.p2 not in (0x01, 0x02):
            return _sw(0x6A86)
        if self._selected != "adf":
            return _sw(0x6985)
        if cmd.p1 != 0x00 or cmd.p2 != 0x02:
            return bytes(4) + SW_OK  # ED / overdraft figures are not modelled
        return self._balance.to_bytes(4, "big") + SW_OK

    def _get_message(self, cmd: Command) -> bytes:
        if self.security_code is None:
            return _sw(0x6D00)
        if cmd.p1 or cmd.p2:
            return _sw(0x6A86)
        if cmd.data or cmd.le not in (None, 9, 256):
            return _sw(0x6700)
        if self._selected != "adf":
            return _sw(0x6985)
        return self.security_code + SW_OK

    # -- helpers -----------------------------------------------------------------------------------

    def _random(self, length: int) -> bytes:
        value = bytes(self.random_source(length))
        if len(value) != length:
            raise ValueError(f"random source returned {len(value)} bytes, wanted {length}")
        return value

    def _session_key(self, algorithm: Algorithm) -> crypto.SessionKeyFn:
        if algorithm == Algorithm.SM4:
            return crypto.SM4_SESSION_KEY_VARIANTS[self.sm4_session_key]
        return crypto.purchase_session_key_3des

    def _key_of_usage(self, usage: str) -> CardKey | None:
        indices = sorted(i for (u, i) in self.keys if u == usage)
        return self.keys[(usage, indices[0])] if indices else None

    def _append_ef18(
        self, counter: int, amount: int, transaction_type: int, terminal: bytes, when: bytes
    ) -> None:
        # EF18 record (§2.3): counter (2) || overdraft (3) || amount (4) || type (1) ||
        # terminal (6) || date (4) || time (3).
        record = (
            counter.to_bytes(2, "big")
            + self.overdraft.to_bytes(3, "big")
            + amount.to_bytes(4, "big")
            + bytes((transaction_type,))
            + terminal
            + when
        )
        self.record_files[0x18].append(record)


# --------------------------------------------------------------------------------------------------
# Factories


def derive_card_keys(
    keyset: KeySet,
    factors: Sequence[bytes],
    algorithm: Algorithm,
    *,
    apdu_order_card_first: bool = True,
) -> dict[tuple[str, int], CardKey]:
    """The card's key table: each master of ``algorithm`` diversified by the first N factors.

    A card without a TAC master of its algorithm borrows one of another algorithm (the SM4 TAC
    format is UNCONFIRMED anyway, §10 item 1).
    """

    def card_key(master: MasterKey) -> CardKey:
        if master.levels > len(factors):
            raise ValueError(
                f"{master.label} needs {master.levels} diversification factors, the card has "
                f"{len(factors)}; pass factors=... to the factory"
            )
        key = crypto.diversify(
            master.key,
            list(factors[: master.levels]),
            master.algorithm,
            apdu_order_card_first=apdu_order_card_first,
        )
        return CardKey(master.version, master.algorithm, key)

    table: dict[tuple[str, int], CardKey] = {}
    for master in keyset:
        if master.algorithm == algorithm:
            table[(master.usage, master.index)] = card_key(master)
    if not any(usage == "tac" for usage, _ in table):
        for master in keyset.of_usage("tac"):
            table[("tac", master.index)] = card_key(master)
            break
    return table


def _bcd(text: str, length: int, what: str) -> bytes:
    value = crypto.bcd_encode(text)
    if len(value) != length:
        raise ValueError(f"{what} must be {2 * length} BCD digits, got {text!r}")
    return value


def _serial_of(asn: bytes, serial: bytes | None, prefix: bytes) -> bytes:
    value = bytes(serial) if serial is not None else bytes(prefix) + bytes(asn)
    if len(value) != 10:
        raise ValueError(f"application serial must be 10 bytes, got {len(value)}")
    return value


def _cyclic_files(extra: dict[int, RecordFile] | None = None) -> dict[int, RecordFile]:
    files = {0x18: RecordFile("cyclic", record_size=23, max_records=10)}  # §2.3 EF18
    files.update(extra or {})
    return files


def _pboc_ef15(
    first8: bytes, app_type: int, flag: int, serial: bytes, start: str, expiry: str, tail: bytes
) -> bytes:
    # §2.3 EF15 (30 bytes): 8 || type (1) || flag/version (1) || serial (10) || start || expiry || 2
    return (
        first8
        + bytes((app_type, flag))
        + serial
        + _bcd(start, 4, "start date")
        + _bcd(expiry, 4, "expiry date")
        + tail
    )


def make_tunion_card(
    *,
    keyset: KeySet,
    asn: bytes = DEFAULT_ASN,
    serial: bytes | None = None,
    serial_prefix: bytes = b"\x03\x10",
    balance: int = 0,
    overdraft: int = 0,
    offline_counter: int = 0,
    online_counter: int = 0,
    issuer_id: bytes = bytes.fromhex("01011000FFFFFFFF"),
    province_code: str = "1000",
    city_code: str = "1000",
    start_date: str = "20190718",
    expiry_date: str = "20401231",
    enable_flag: int = 0x01,
    app_type: int = 0x02,
    app_version: int = 0x02,
    interop: bool = True,
    card_catalogue: int = 1,
    ef15_tail: bytes = b"\x00\x00",
    lock: LockState = "none",
    algorithm: Algorithm = Algorithm.TDES,
    random_source: RandomSource | None = None,
    uid: bytes | None = None,
    ats: bytes = DEFAULT_ATS,
    apdu_order_card_first: bool = True,
    **options: Any,
) -> SimulatedCpuCard:
    """A T-Union (JT/T 978) card: PPSE + ADF A000000632010105, factors (ASN, EF15[0..7])."""
    serial10 = _serial_of(asn, serial, serial_prefix)
    ef15 = _pboc_ef15(
        bytes(issuer_id), app_type, enable_flag, serial10, start_date, expiry_date, ef15_tail
    )
    # §2.3 EF17 (60 bytes): country || province || city || interop flag || catalogue || RFU
    ef17 = (
        bytes.fromhex("00000156")
        + _bcd(province_code, 2, "province code")
        + _bcd(city_code, 2, "city code")
        + (b"\x00\x01" if interop else b"\x00\x00")
        + bytes((card_catalogue,))
    ).ljust(60, b"\x00")
    # §2.2 FCI: 6F [84 AID, A5 [9F08 version, 9F0C EF15]]
    fci = _tlv(
        0x6F,
        _tlv(0x84, TUNION_AID)
        + _tlv(0xA5, _tlv(0x9F08, bytes((app_version,))) + _tlv(0x9F0C, ef15)),
    )
    capp_records = [
        bytes((0x27, n, 0x7D)).ljust(128, b"\x00") for n in (1, 2, 3)
    ]  # §2.3 EF1A/EF19: "27 02 7D ..." at record 2; identifier at offset 1
    files = _cyclic_files(
        {
            0x1E: RecordFile("cyclic", record_size=48, max_records=30),
            0x1A: RecordFile("capp", records=capp_records, id_offset=1),
            0x19: RecordFile("capp", records=capp_records, id_offset=1),
        }
    )
    factors = (ef15[12:20], ef15[0:8])
    return SimulatedCpuCard(
        family="tunion",
        uid=uid if uid is not None else ef15[16:20],
        ats=ats,
        adf_name=TUNION_AID,
        adf_fids=(),
        fci=fci,
        binaries={0x15: ef15, 0x16: bytes(55), 0x17: ef17},
        record_files=files,
        keys=derive_card_keys(
            keyset, factors, algorithm, apdu_order_card_first=apdu_order_card_first
        ),
        balance=balance,
        overdraft=overdraft,
        offline_counter=offline_counter,
        online_counter=online_counter,
        lock=lock,
        random_source=random_source,
        ppse=True,
        **options,
    )


def make_cjt166_card(
    *,
    keyset: KeySet,
    asn: bytes = DEFAULT_ASN,
    serial: bytes | None = None,
    serial_prefix: bytes = b"\x10\x00",
    balance: int = 0,
    overdraft: int = 0,
    offline_counter: int = 0,
    online_counter: int = 0,
    issuer_code: bytes = b"\x00\x01",
    city_code: str = "1000",
    industry_code: bytes = b"\x00\x01",
    start_date: str = "20190718",
    expiry_date: str = "20401231",
    interop: bool = True,
    app_type: int | None = None,
    app_version: int = 0x01,
    card_catalogue: int = 1,
    ef05: bytes | None = None,
    security_code: bytes | None = None,
    lock: LockState = "none",
    algorithm: Algorithm = Algorithm.TDES,
    random_source: RandomSource | None = None,
    uid: bytes | None = None,
    ats: bytes = DEFAULT_ATS,
    apdu_order_card_first: bool = True,
    **options: Any,
) -> SimulatedCpuCard:
    """A CJ/T 166 City Union card: 3F00 + ADF A00000000386980701, factors (ASN, city||FF00..).

    EF15[8] is 01 when ``interop`` (or ``app_type`` if given). EF05 is issuer-specific (§2.3): by
    default 32 bytes with the card catalogue in byte 0. EF17 is the CAPP record file with one
    48-byte record ``01 2E 00 ...``.
    """
    serial10 = _serial_of(asn, serial, serial_prefix)
    city = _bcd(city_code, 2, "city code")
    type_byte = app_type if app_type is not None else (0x01 if interop else 0x00)
    ef15 = _pboc_ef15(
        bytes(issuer_code) + city + bytes(industry_code) + b"\x00\x00",
        type_byte,
        app_version,
        serial10,
        start_date,
        expiry_date,
        b"\x00\x00",
    )
    fci = _tlv(0x6F, _tlv(0x84, CJT166_AID) + _tlv(0xA5, _tlv(0x9F0C, ef15)))  # §2.2
    files = _cyclic_files(
        {0x17: RecordFile("capp", records=[bytes((0x01, 0x2E, 0x00)).ljust(48, b"\x00")])}
    )
    if security_code is None:
        # The 安全认证识别码 algorithm is unknown; any stable 9 bytes stand in for it (§4.5).
        security_code = hashlib.sha256(b"CJT166" + serial10).digest()[:9]
    factors = (ef15[12:20], city + bytes.fromhex("FF0000000000"))
    return SimulatedCpuCard(
        family="cjt166",
        uid=uid if uid is not None else ef15[16:20],
        ats=ats,
        adf_name=CJT166_AID,
        adf_fids=CJT166_FIDS,
        fci=fci,
        binaries={
            0x15: ef15,
            0x05: ef05 if ef05 is not None else bytes((card_catalogue,)).ljust(32, b"\x00"),
        },
        record_files=files,
        keys=derive_card_keys(
            keyset, factors, algorithm, apdu_order_card_first=apdu_order_card_first
        ),
        balance=balance,
        overdraft=overdraft,
        offline_counter=offline_counter,
        online_counter=online_counter,
        lock=lock,
        random_source=random_source,
        security_code=bytes(security_code),
        **options,
    )


def make_legacy_1001_card(
    *,
    keyset: KeySet,
    asn: bytes = DEFAULT_ASN,
    serial: bytes | None = None,
    serial_prefix: bytes = b"\x00\x00",
    balance: int = 0,
    overdraft: int = 0,
    offline_counter: int = 0,
    online_counter: int = 0,
    issuer_id: bytes = bytes.fromhex("1000000000000000"),
    start_date: str = "20190718",
    expiry_date: str = "20401231",
    enable_flag: int = 0x01,
    app_type: int = 0x02,
    df_name: bytes = b"PBOC",
    factors: Sequence[bytes] | None = None,
    lock: LockState = "none",
    algorithm: Algorithm = Algorithm.TDES,
    random_source: RandomSource | None = None,
    uid: bytes | None = None,
    ats: bytes = DEFAULT_ATS,
    apdu_order_card_first: bool = True,
    **options: Any,
) -> SimulatedCpuCard:
    """A legacy city card: DF 1001 (``00 A4 00 00 02 10 01``), DF name "PBOC", EF15 in the
    T-Union layout, one diversification level (ASN) unless ``factors`` is given (card first)."""
    serial10 = _serial_of(asn, serial, serial_prefix)
    ef15 = _pboc_ef15(
        bytes(issuer_id), app_type, enable_flag, serial10, start_date, expiry_date, b"\x00\x00"
    )
    fci = _tlv(0x6F, _tlv(0x84, df_name) + _tlv(0xA5, _tlv(0x9F08, b"\x02")))
    card_factors = tuple(factors) if factors is not None else (ef15[12:20],)
    return SimulatedCpuCard(
        family="legacy1001",
        uid=uid if uid is not None else ef15[16:20],
        ats=ats,
        adf_name=df_name,
        adf_fids=(LEGACY_FID,),
        fci=fci,
        binaries={0x15: ef15},
        record_files=_cyclic_files(),
        keys=derive_card_keys(
            keyset, card_factors, algorithm, apdu_order_card_first=apdu_order_card_first
        ),
        balance=balance,
        overdraft=overdraft,
        offline_counter=offline_counter,
        online_counter=online_counter,
        lock=lock,
        random_source=random_source,
        **options,
    )


def fixed_random(*values: bytes) -> RandomSource:
    """A random source for tests: returns the given values in turn (the last one repeats),
    truncated or zero-extended to the requested length."""
    queue = [bytes(v) for v in values] or [bytes(8)]

    def source(length: int) -> bytes:
        value = queue.pop(0) if len(queue) > 1 else queue[0]
        return value[:length].ljust(length, b"\x00")

    return source
