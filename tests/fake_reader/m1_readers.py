"""Readers in front of the M1 card model (m1-purse-and-readers.md §6):

* :class:`InProcessM1Reader` — the semantic (L1) reader: ``CardReader`` + ``StorageCardReader``
  calling the card model directly. Fastest; used by the purse and tearing tests.
* :class:`AcsReaderModel` — a PC/SC contactless reader with ACS firmware: answers the CLA FF
  pseudo-APDUs of §4a (FF CA, FF 82, FF 86, FF 88, FF B0, FF D6, FF B1, FF D7) with the status
  words of §4a.3. :class:`PcscM1Reader` puts the agent's :class:`PseudoApduStorage` in front of
  it, exactly as the PC/SC driver does in front of pyscard.
* :class:`RawFrameReader` + :class:`M1FrameCard` — the L2 model: Crypto1 three-pass (first and
  nested) authentication, encrypted frames with parity and encrypted 4-bit ACK/NAK between a
  reader that runs Crypto1 itself and the card.

Card removal mid-command (:class:`CardTorn`) empties the field and surfaces as
:class:`agent.errors.CardRemovedError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from agent.errors import CardProtocolError, CardRemovedError, ReaderError
from agent.products.m1_codec import encode_value_block
from agent.readers.base import CardPresence, CardTechnology
from agent.readers.storage import (
    AuthenticationFailed,
    KeyType,
    PseudoApduStorage,
    StorageOperationRefused,
    ValueOp,
)
from tests.fake_reader.crypto1 import (
    ACK,
    Crypto1,
    crc_a,
    frame_with_parity,
    odd_parity,
    prng_successor,
)
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.m1_card import M1AuthFailed, M1Card, M1Nak

T = TypeVar("T")


# The RF field of one reader holds M1 cards as well as CPU cards.
M1Field = CardField


def presence_of(card: M1Card) -> CardPresence:
    return CardPresence(card.uid, CardTechnology.MIFARE_CLASSIC, card.sak)


class InProcessM1Reader:
    """``CardReader`` + ``StorageCardReader`` straight onto an :class:`M1Card` (L1)."""

    def __init__(self, field: M1Field, name: str = "in-process-m1") -> None:
        self.field = field
        self.name = name
        self.feedback_log: list[tuple[bool, str]] = []
        self._keys: dict[int, bytes] = {}

    # CardReader
    def wait_for_card(self, timeout: float) -> CardPresence | None:
        deadline = time.monotonic() + timeout
        while True:
            card = self.field.card
            if isinstance(card, M1Card):
                card.select()
                return presence_of(card)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.002)

    def transmit(self, apdu: bytes) -> bytes:
        raise CardProtocolError(f"{self.name}: a MIFARE Classic card does not take APDUs")

    def wait_for_removal(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.field.card is not None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def feedback(self, ok: bool, text: str) -> None:
        self.feedback_log.append((ok, text))

    def close(self) -> None:
        pass

    # StorageCardReader
    def _card(self) -> M1Card:
        card = self.field.card
        if not isinstance(card, M1Card):
            raise CardRemovedError(f"{self.name}: no card in the field")
        return card

    def _call(self, operation: str, block: int, fn: Callable[[M1Card], T]) -> T:
        card = self._card()
        try:
            return fn(card)
        except CardTorn as exc:
            self.field.remove()
            raise CardRemovedError(f"{self.name}: card left during {operation}: {exc}") from exc
        except M1AuthFailed as exc:
            raise AuthenticationFailed(operation, block, exc.reason, exc.code) from exc
        except M1Nak as exc:
            raise StorageOperationRefused(operation, block, exc.reason, exc.code) from exc

    def load_key(self, slot: int, key: bytes) -> None:
        if len(key) != 6:
            raise ReaderError(f"{self.name}: a key is 6 bytes")
        self._keys[slot] = bytes(key)

    def authenticate(self, block: int, key_type: KeyType, slot: int) -> None:
        key = self._keys.get(slot)
        if key is None:
            raise ReaderError(f"{self.name}: key slot {slot} is empty")

        def auth(card: M1Card) -> None:
            if card.state == "idle":  # the reader re-activates a card that fell back to IDLE
                card.select()
            card.authenticate(block, key_type, key)

        self._call("authenticate", block, auth)

    def read_block(self, block: int) -> bytes:
        return self._call("read", block, lambda c: c.read(block))

    def write_block(self, block: int, data: bytes) -> None:
        self._call("write", block, lambda c: c.write(block, data))

    def increment(self, block: int, value: int) -> None:
        self._call("increment", block, lambda c: c.increment(block, value))

    def decrement(self, block: int, value: int) -> None:
        self._call("decrement", block, lambda c: c.decrement(block, value))

    def restore(self, block: int) -> None:
        self._call("restore", block, lambda c: c.restore(block))

    def transfer(self, block: int) -> None:
        self._call("transfer", block, lambda c: c.transfer(block))

    def value_transfer(self, op: ValueOp, block: int, value: int, dest: int) -> None:
        if op == "increment":
            self.increment(block, value)
        elif op == "decrement":
            self.decrement(block, value)
        else:
            self.restore(block)
        self.transfer(dest)


# --- PC/SC (ACS firmware) reader model ---------------------------------------------------------

SW_OK = b"\x90\x00"
SW_FAIL = b"\x63\x00"

KEY_SLOTS = 0x20


class AcsReaderModel:
    """An ACS-style PC/SC reader holding an M1 card: CLA FF pseudo-APDUs in, answers out.

    Raises :class:`CardTorn` when the card leaves mid-command (pcscd then reports the card
    removed). ``apdus`` records every command for inspection.
    """

    def __init__(self, field: M1Field) -> None:
        self.field = field
        self.keys: dict[int, bytes] = {}
        self.apdus: list[bytes] = []

    def process(self, apdu: bytes) -> bytes:
        raw = bytes(apdu)
        self.apdus.append(raw)
        if len(raw) < 5 or raw[0] != 0xFF:
            return b"\x6e\x00"
        ins, p1, p2, lc = raw[1], raw[2], raw[3], raw[4]
        data = raw[5 : 5 + lc] if ins not in (0xB0, 0xB1, 0xCA) else b""
        if ins not in (0xB0, 0xB1, 0xCA) and len(raw) != 5 + lc:
            return b"\x67\x00"
        if ins == 0x82:
            if lc != 6 or p2 >= KEY_SLOTS or p1 not in (0x00, 0x20):
                return b"\x69\x86" if lc == 6 else b"\x67\x00"
            self.keys[p2] = data
            return SW_OK
        card = self.field.card
        if not isinstance(card, M1Card):
            return SW_FAIL
        try:
            return self._card_command(card, ins, p1, p2, lc, data)
        except CardTorn:
            self.field.remove()
            raise
        except M1Nak:
            return SW_FAIL

    def _card_command(
        self, card: M1Card, ins: int, p1: int, p2: int, lc: int, data: bytes
    ) -> bytes:
        if ins == 0xCA:
            return (card.uid if p1 == 0x00 else b"") + SW_OK
        if ins == 0x86:
            if lc != 5:
                return b"\x67\x00"
            if data[0] != 0x01:
                return b"\x69\x83"
            return self._auth(card, data[2], data[3], data[4])
        if ins == 0x88:
            if lc not in (0x60, 0x61) or len(data) != 1:
                return b"\x69\x86"
            return self._auth(card, p2, lc, data[0])
        if ins == 0xB0:
            if lc not in (0x10, 0x00):
                return b"\x6c\x10"
            return card.read(p2) + SW_OK
        if ins == 0xD6:
            if lc != 0x10:
                return b"\x67\x00"
            card.write(p2, data)
            return SW_OK
        if ins == 0xB1:
            value = card.read(p2)
            return value[0:4][::-1] + SW_OK
        if ins == 0xD7:
            return self._value(card, p2, data)
        return b"\x6a\x81"

    def _auth(self, card: M1Card, block: int, key_type: int, slot: int) -> bytes:
        if key_type not in (0x60, 0x61):
            return b"\x69\x86"
        key = self.keys.get(slot)
        if key is None:
            return b"\x69\x88"
        if card.state == "idle":
            card.select()
        card.authenticate(block, KeyType(key_type), key)
        return SW_OK

    def _value(self, card: M1Card, block: int, data: bytes) -> bytes:
        if len(data) == 2 and data[0] == 0x03:  # FF D7 00 src 02 03 dst
            card.restore(block)
            card.transfer(data[1])
            return SW_OK
        if len(data) != 5:
            return b"\x67\x00"
        op, value = data[0], int.from_bytes(data[1:5], "big", signed=data[0] == 0x00)
        if op == 0x00:
            card.write(block, encode_value_block(value, block))
        elif op == 0x01:
            card.increment(block, value)
            card.transfer(block)
        elif op == 0x02:
            card.decrement(block, value)
            card.transfer(block)
        else:
            return b"\x6a\x81"
        return SW_OK


class PcscM1Reader(PseudoApduStorage):
    """A ``CardReader`` + ``StorageCardReader`` through the pseudo-APDU reader model, as the
    PC/SC driver would be: ``transmit`` is SCardTransmit, CardTorn is a removed card."""

    def __init__(self, field: M1Field, name: str = "pcsc-m1-model") -> None:
        self.model = AcsReaderModel(field)
        self.field = field
        self.name = name
        self.feedback_log: list[tuple[bool, str]] = []
        super().__init__(self.transmit)

    def wait_for_card(self, timeout: float) -> CardPresence | None:
        card = self.field.card
        if isinstance(card, M1Card):
            card.select()
            return presence_of(card)
        return None

    def transmit(self, apdu: bytes) -> bytes:
        try:
            return self.model.process(apdu)
        except CardTorn as exc:
            raise CardRemovedError(f"{self.name}: card removed: {exc}") from exc

    def wait_for_removal(self, timeout: float) -> bool:
        return self.field.card is None

    def feedback(self, ok: bool, text: str) -> None:
        self.feedback_log.append((ok, text))

    def close(self) -> None:
        pass


# --- L2: Crypto1 frames between a raw reader and the card ------------------------------------

Frame = list[tuple[int, int]]  # (byte, parity bit sent)
Answer = Frame | int | None  # a frame, a 4-bit ACK/NAK, or silence

NAK = 0x4


class M1FrameCard:
    """The card's RF front end at frame level: anticollision, Crypto1 three-pass (first and
    nested) authentication with encrypted parity, encrypted commands and 4-bit ACK/NAK
    (m1-purse-and-readers.md §1.4, §2.2). Memory, access rules and tears are the wrapped
    :class:`M1Card`'s. ``nonces`` supplies nT (default: the card PRNG from a seed)."""

    def __init__(self, card: M1Card, prng_seed: int = 0x01200145) -> None:
        self.card = card
        self.uid = card.uid
        self.sak = card.sak
        self.ats = b""
        self.technology_code = card.technology_code
        self._prng = prng_seed
        self.log: list[tuple[str, bytes]] = []
        self.power_on()

    def power_on(self) -> None:
        self.card.power_on()
        self._cipher: Crypto1 | None = None
        self._auth: tuple[Crypto1, int, int, KeyType] | None = None  # state, nT, block, key
        self._pending: tuple[int, int] | None = None  # two-part command: (cmd, block)
        self._cascade = 0

    def _next_nonce(self) -> int:
        self._prng = prng_successor(self._prng, 32)
        return self._prng

    def _idle(self) -> None:
        self._cipher = None
        self._auth = None
        self._pending = None
        self.card.power_on()

    def _reply(self, plain: bytes) -> Frame:
        if self._cipher is None:
            return frame_with_parity(plain)
        return self._cipher.encrypt(plain)

    def _ack(self, value: int) -> int:
        return self._cipher.nibble(value) if self._cipher is not None else value

    def exchange(self, frame: Frame | int) -> Answer:
        """One reader frame in (an int = a 7-bit short frame), the card's answer out."""
        if isinstance(frame, int):  # REQA 26 / WUPA 52
            if frame in (0x26, 0x52):
                self._idle()
                self._cascade = 0
                return frame_with_parity(self.card.atqa)
            return None
        if self._auth is not None:
            return self._auth_answer(frame)
        if self._cipher is None:
            data = bytes(b for b, _ in frame)
        else:
            data, parity_ok = self._cipher.decrypt(frame)
            if not parity_ok:
                self._idle()
                return None
        return self._command(data)

    def _command(self, data: bytes) -> Answer:
        if data[:1] in (b"\x93", b"\x95") and len(data) == 2 and data[1] == 0x20:
            return frame_with_parity(self._cascade_uid(data[0]))
        if len(data) < 3 or crc_a(data[:-2]) != data[-2:]:
            self._idle()
            return None
        body = data[:-2]
        if body[0] in (0x93, 0x95) and len(body) == 7:
            cl = self._cascade_uid(body[0])
            if body[2:7] != cl:
                return None
            last = len(self.uid) == 4 or body[0] == 0x95
            if last:
                self.card.select()
            sak = self.sak if last else 0x04
            return frame_with_parity(bytes((sak,)) + crc_a(bytes((sak,))))
        if self._pending is not None:
            return self._second_part(body)
        cmd = body[0]
        if cmd in (0x60, 0x61) and len(body) == 2:
            return self._auth_start(KeyType(cmd), body[1])
        if self.card.state != "auth" or self._cipher is None:
            self._idle()
            return None
        if cmd == 0x30 and len(body) == 2:
            try:
                block = self.card.read(body[1])
            except M1Nak:
                return self._nak()
            return self._reply(block + crc_a(block))
        if cmd in (0xA0, 0xC0, 0xC1, 0xC2) and len(body) == 2:
            self._pending = (cmd, body[1])
            return self._ack(ACK)
        if cmd == 0xB0 and len(body) == 2:
            try:
                self.card.transfer(body[1])
            except M1Nak:
                return self._nak()
            return self._ack(ACK)
        if cmd == 0x50:
            self._idle()
            return None
        return self._nak()

    def _nak(self) -> int:
        answer = self._ack(NAK)
        self._idle()
        return answer

    def _cascade_uid(self, sel: int) -> bytes:
        uid = self.uid
        part = (b"\x88" + uid[:3]) if len(uid) == 7 and sel == 0x93 else uid[-4:]
        if len(uid) == 4:
            part = uid
        return part + bytes((part[0] ^ part[1] ^ part[2] ^ part[3],))

    def _second_part(self, body: bytes) -> Answer:
        assert self._pending is not None
        cmd, block = self._pending
        self._pending = None
        try:
            if cmd == 0xA0:
                if len(body) != 16:
                    return self._nak()
                self.card.write(block, body)
                return self._ack(ACK)
            if len(body) != 4:
                return self._nak()
            operand = int.from_bytes(body, "little")
            if cmd == 0xC0:
                self.card.decrement(block, operand)
            elif cmd == 0xC1:
                self.card.increment(block, operand)
            else:
                self.card.restore(block)
        except M1Nak:
            return self._nak()
        return None  # part 2 of a value operation is never acknowledged (§1.4)

    def _auth_start(self, key_type: KeyType, block: int) -> Answer:
        if not 0 <= block < self.card.blocks:
            return self._nak()
        key_a, key_b = self.card.keys_of(sector_of_block(block))
        state = Crypto1(key_a if key_type is KeyType.A else key_b)
        nt = self._next_nonce()
        uid = int.from_bytes(self.card.auth_uid, "big")
        nested = self._cipher is not None
        if nested:
            answer: Frame = []
            for feed, plain in zip(
                (uid ^ nt).to_bytes(4, "big"), nt.to_bytes(4, "big"), strict=True
            ):
                ks = state.byte(feed)
                answer.append((plain ^ ks, odd_parity(plain) ^ state.peek()))
        else:
            state.word(uid ^ nt)
            answer = frame_with_parity(nt.to_bytes(4, "big"))
        self._cipher = None
        self._auth = (state, nt, block, key_type)
        return answer

    def _auth_answer(self, frame: Frame) -> Answer:
        assert self._auth is not None
        state, nt, block, key_type = self._auth
        self._auth = None
        if len(frame) != 8:
            self._idle()
            return None
        for c, _ in frame[:4]:
            state.byte(c, encrypted=True)  # the LFSR takes the plain nR
        ar, parity_ok = state.decrypt(frame[4:])
        if not parity_ok or int.from_bytes(ar, "big") != prng_successor(nt, 64):
            self._idle()  # a wrong aR gets silence (§2.2)
            return None
        try:
            key_a, key_b = self.card.keys_of(sector_of_block(block))
            self.card.authenticate(block, key_type, key_a if key_type is KeyType.A else key_b)
        except M1Nak:
            self._idle()
            return None
        self._cipher = state
        return state.encrypt(prng_successor(nt, 96).to_bytes(4, "big"))


def sector_of_block(block: int) -> int:
    return block // 4 if block < 128 else 32 + (block - 128) // 16


class RawFrameReader:
    """A reader that runs Crypto1 itself over :class:`M1FrameCard` frames (like a PN53x with
    InCommunicateThru): ``CardReader`` + ``StorageCardReader``. ``frames`` counts exchanges."""

    def __init__(
        self, field: M1Field, name: str = "raw-frame-m1", nr_seed: int = 0x12345678
    ) -> None:
        self.field = field
        self.name = name
        self.feedback_log: list[tuple[bool, str]] = []
        self.frames = 0
        self._keys: dict[int, bytes] = {}
        self._cipher: Crypto1 | None = None
        self._active = False
        self._uid4 = b""
        self._nr = nr_seed

    # transport
    def _card(self) -> M1FrameCard:
        card = self.field.card
        if not isinstance(card, M1FrameCard):
            raise CardRemovedError(f"{self.name}: no card in the field")
        return card

    def _send(self, frame: Frame | int, operation: str) -> Answer:
        card = self._card()
        self.frames += 1
        try:
            return card.exchange(frame)
        except CardTorn as exc:
            self.field.remove()
            self._reset()
            raise CardRemovedError(f"{self.name}: card left during {operation}: {exc}") from exc

    def _reset(self) -> None:
        self._cipher = None
        self._active = False

    def _command(self, plain: bytes, operation: str) -> Answer:
        data = plain + crc_a(plain)
        frame = self._cipher.encrypt(data) if self._cipher else frame_with_parity(data)
        return self._send(frame, operation)

    def _expect_ack(self, answer: Answer, operation: str, block: int) -> None:
        if answer is None:
            self._reset()
            raise CardRemovedError(f"{self.name}: no answer to {operation} of block {block}")
        if not isinstance(answer, int):
            self._reset()
            raise CardProtocolError(f"{self.name}: {operation}: a frame where an ACK was due")
        nibble = self._cipher.nibble(answer) if self._cipher else answer
        if nibble != ACK:
            self._reset()
            raise StorageOperationRefused(operation, block, f"NAK {nibble:X}", nibble)

    # activation
    def activate(self) -> CardPresence:
        atqa = self._send(0x52, "WUPA")
        if not isinstance(atqa, list):
            raise CardRemovedError(f"{self.name}: no ATQA")
        card = self._card()
        levels = (0x93,) if len(card.uid) == 4 else (0x93, 0x95)
        uid = b""
        sak = 0
        for sel in levels:
            answer = self._send(frame_with_parity(bytes((sel, 0x20))), "anticollision")
            if not isinstance(answer, list) or len(answer) != 5:
                raise CardProtocolError(f"{self.name}: bad anticollision answer")
            cl = bytes(b for b, _ in answer)
            if cl[0] ^ cl[1] ^ cl[2] ^ cl[3] != cl[4]:
                raise CardProtocolError(f"{self.name}: BCC error")
            select = bytes((sel, 0x70)) + cl
            sak_frame = self._send(frame_with_parity(select + crc_a(select)), "select")
            if not isinstance(sak_frame, list) or len(sak_frame) != 3:
                raise CardProtocolError(f"{self.name}: bad SAK")
            sak = sak_frame[0][0]
            uid += cl[1:4] if cl[0] == 0x88 else cl[:4]
        self._active = True
        self._cipher = None
        self._uid4 = uid[-4:]
        return CardPresence(uid, CardTechnology.MIFARE_CLASSIC, sak)

    # CardReader
    def wait_for_card(self, timeout: float) -> CardPresence | None:
        if not isinstance(self.field.card, M1FrameCard):
            return None
        return self.activate()

    def transmit(self, apdu: bytes) -> bytes:
        raise CardProtocolError(f"{self.name}: a MIFARE Classic card does not take APDUs")

    def wait_for_removal(self, timeout: float) -> bool:
        return self.field.card is None

    def feedback(self, ok: bool, text: str) -> None:
        self.feedback_log.append((ok, text))

    def close(self) -> None:
        pass

    # StorageCardReader
    def load_key(self, slot: int, key: bytes) -> None:
        if len(key) != 6:
            raise ReaderError(f"{self.name}: a key is 6 bytes")
        self._keys[slot] = bytes(key)

    def authenticate(self, block: int, key_type: KeyType, slot: int) -> None:
        key = self._keys.get(slot)
        if key is None:
            raise ReaderError(f"{self.name}: key slot {slot} is empty")
        if not self._active:
            self.activate()
        answer = self._command(bytes((key_type.value, block)), "authenticate")
        if not isinstance(answer, list) or len(answer) != 4:
            self._reset()
            raise AuthenticationFailed("authenticate", block, "no nonce")
        enc_nt = int.from_bytes(bytes(b for b, _ in answer), "big")
        uid = int.from_bytes(self._uid4, "big")
        state = Crypto1(key)
        if self._cipher is None:
            nt = enc_nt
            state.word(uid ^ nt)
        else:
            nt = state.word(uid ^ enc_nt, encrypted=True) ^ enc_nt
        self._nr = prng_successor(self._nr, 7)
        frame: Frame = []
        for b in self._nr.to_bytes(4, "big"):
            frame.append((state.byte(b) ^ b, odd_parity(b) ^ state.peek()))
        frame += state.encrypt(prng_successor(nt, 64).to_bytes(4, "big"))
        at = self._send(frame, "authenticate")
        if not isinstance(at, list) or len(at) != 4:
            self._reset()
            raise AuthenticationFailed("authenticate", block, "the card stayed silent (wrong key?)")
        plain, parity_ok = state.decrypt(at)
        if not parity_ok or int.from_bytes(plain, "big") != prng_successor(nt, 96):
            self._reset()
            raise AuthenticationFailed("authenticate", block, "card answer aT is wrong")
        self._cipher = state

    def read_block(self, block: int) -> bytes:
        answer = self._command(bytes((0x30, block)), "read")
        if isinstance(answer, int):
            self._expect_ack(answer, "read", block)
        if not isinstance(answer, list) or len(answer) != 18 or self._cipher is None:
            self._reset()
            raise CardRemovedError(f"{self.name}: no answer to read of block {block}")
        plain, parity_ok = self._cipher.decrypt(answer)
        if not parity_ok or crc_a(plain[:16]) != plain[16:]:
            self._reset()
            raise CardProtocolError(f"{self.name}: read of block {block}: CRC/parity error")
        return plain[:16]

    def write_block(self, block: int, data: bytes) -> None:
        self._expect_ack(self._command(bytes((0xA0, block)), "write"), "write", block)
        self._expect_ack(self._command(bytes(data), "write"), "write", block)

    def _value(self, cmd: int, operation: str, block: int, value: int) -> None:
        self._expect_ack(self._command(bytes((cmd, block)), operation), operation, block)
        answer = self._command(value.to_bytes(4, "little"), operation)
        if answer is not None:  # silence = OK; a NAK refuses (§1.4)
            self._expect_ack(answer, operation, block)

    def increment(self, block: int, value: int) -> None:
        self._value(0xC1, "increment", block, value)

    def decrement(self, block: int, value: int) -> None:
        self._value(0xC0, "decrement", block, value)

    def restore(self, block: int) -> None:
        self._value(0xC2, "restore", block, 0)

    def transfer(self, block: int) -> None:
        self._expect_ack(self._command(bytes((0xB0, block)), "transfer"), "transfer", block)

    def value_transfer(self, op: ValueOp, block: int, value: int, dest: int) -> None:
        if op == "increment":
            self.increment(block, value)
        elif op == "decrement":
            self.decrement(block, value)
        else:
            self.restore(block)
        self.transfer(dest)
