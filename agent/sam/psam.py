"""Driver for a hardware (or simulated) PSAM in a contact slot (cpu-purse.md §4).

The command builders and response parsers are pure functions, testable against transcripts;
:class:`PsamDriver` only sequences them over a :class:`agent.readers.base.SamSlot`. Every answer
goes through :func:`agent.apdu.parse_response` / :func:`agent.apdu.require` with
:attr:`Party.SAM`, so malformed answers raise :class:`SamProtocolError` and refusals
:class:`SamStatusError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from agent import crypto
from agent.apdu import Command, Party, Response, parse_response, require
from agent.errors import (
    ConfigurationError,
    ReaderError,
    SamError,
    SamMuteError,
    SamProtocolError,
)
from agent.readers.base import SamSlot
from agent.sam.base import PurchaseMac, PurchaseMacRequest

log = structlog.get_logger(__name__)

# T-Union PSAM application: AID A000000632 || "MOT.CPSAM01" (§4.1, S3).
TUNION_PSAM_AID = bytes.fromhex("A000000632") + b"MOT.CPSAM01"
TUNION_PSAM_FID = bytes.fromhex("8011")  # S2
CJT166_PSAM_FID = bytes.fromhex("1001")  # S2, S3
CJT166_PSAM_NAME = "建设部".encode("gbk")  # BD A8 C9 E8 B2 BF (§4.1, S3)
MF_FID = bytes.fromhex("3F00")

EF15_SFI, EF16_SFI, EF17_SFI = 0x15, 0x16, 0x17
EF15_LENGTH = 0x0E  # serial (10) || version (1) || key-card type (1) || FCI (2)  (§4.1)
EF16_LENGTH = 0x06  # terminal number
EF17_LENGTH = 0x19  # purchase key index (1) || issuer id (8) || receiver id (8) || dates (8)

SelectStep = tuple[Literal["aid", "fid"], bytes]


@dataclass(frozen=True, slots=True)
class PsamConfig:
    """How to open a PSAM (§4.1); everything below H confidence is an option here.

    ``application`` is the selection path of the PSAM application: ``("aid", name)`` selects by
    DF name, ``("fid", fid)`` by file id. ``read_ids_before_application`` reads EF15/EF16 under
    the MF before selecting the application (real PSAMs keep them there).
    """

    application: tuple[SelectStep, ...] = (("aid", TUNION_PSAM_AID),)
    select_mf_first: bool = True
    read_ids_before_application: bool = True
    read_serial: bool = True

    @classmethod
    def tunion(cls, *, by_fid: bool = False) -> PsamConfig:
        step: SelectStep = ("fid", TUNION_PSAM_FID) if by_fid else ("aid", TUNION_PSAM_AID)
        return cls(application=(step,))

    @classmethod
    def cjt166(cls) -> PsamConfig:
        return cls(application=(("fid", CJT166_PSAM_FID), ("aid", CJT166_PSAM_NAME)))

    @classmethod
    def for_application(cls, name: str) -> PsamConfig:
        """The profile's ``sam.application`` value: ``tunion`` or ``cjt166``."""
        return cls(application=application_path(name))


ApplicationPath = tuple[SelectStep, ...]


def application_path(preset: str = "", *, aid: bytes = b"", fid: bytes = b"") -> ApplicationPath:
    """The selection path (from the MF) of a PSAM application (§4.1).

    ``preset``: ``tunion`` (AID A000000632 || "MOT.CPSAM01") or ``cjt166`` (FID 1001, then the
    name "建设部"); otherwise ``fid`` and/or ``aid`` (FID first when both are given, as the
    CJ/T 166 path does).
    """
    if preset:
        if aid or fid:
            raise ConfigurationError("a PSAM application is a preset or an aid/fid, not both")
        if preset == "tunion":
            return (("aid", TUNION_PSAM_AID),)
        if preset == "cjt166":
            return (("fid", CJT166_PSAM_FID), ("aid", CJT166_PSAM_NAME))
        raise ConfigurationError(f"unknown PSAM application {preset!r} (tunion | cjt166)")
    steps: list[SelectStep] = []
    if fid:
        if len(fid) != 2:
            raise ConfigurationError(f"PSAM application FID must be 2 bytes, got {fid.hex()}")
        steps.append(("fid", bytes(fid)))
    if aid:
        if not 5 <= len(aid) <= 16:
            raise ConfigurationError(f"PSAM application AID must be 5..16 bytes, got {aid.hex()}")
        steps.append(("aid", bytes(aid)))
    if not steps:
        raise ConfigurationError("a PSAM application needs a preset, an aid or a fid")
    return tuple(steps)


def describe_path(path: ApplicationPath) -> str:
    """``fid 1001 / aid BDA8C9E8B2BF`` for logs and errors."""
    return " / ".join(f"{kind} {value.hex().upper()}" for kind, value in path)


# -- command builders (pure) ---------------------------------------------------------------------


def select_mf() -> Command:
    return Command(0x00, 0xA4, 0x00, 0x00, MF_FID, name="SELECT MF")


def select_by_fid(fid: bytes) -> Command:
    return Command(0x00, 0xA4, 0x00, 0x00, bytes(fid), name=f"SELECT {fid.hex().upper()}")


def select_by_name(name: bytes) -> Command:
    return Command(0x00, 0xA4, 0x04, 0x00, bytes(name), name=f"SELECT {name.hex().upper()}")


def read_binary_sfi(sfi: int, length: int, offset: int = 0) -> Command:
    """READ BINARY by short file identifier: ``00 B0 (80|SFI) offset Le`` (§4.1)."""
    return Command(0x00, 0xB0, 0x80 | sfi, offset, le=length, name=f"READ BINARY EF{sfi:02X}")


def get_response(length: int) -> Command:
    return Command(0x00, 0xC0, 0x00, 0x00, le=length, name="GET RESPONSE")


def init_sam_for_purchase(request: PurchaseMacRequest) -> Command:
    """``80 70 00 00 Lc data 08``, Lc = 14 + 8N (§4.2).

    Data: random (4) || card counter (2) || amount (4) || type (1) || date+time (7) ||
    key version (1) || algorithm id (1) || factors (card level first).
    """
    if len(request.card_random) != 4:
        raise ValueError("card random must be 4 bytes")
    if not request.factors or any(len(f) != 8 for f in request.factors):
        raise ValueError("diversification factors must be 1..3 blocks of 8 bytes")
    data = (
        bytes(request.card_random)
        + request.card_counter.to_bytes(2, "big")
        + request.amount.to_bytes(4, "big")
        + bytes((request.transaction_type,))
        + crypto.datetime7(request.when)
        + bytes((request.key_version, request.algorithm))
        + b"".join(request.factors)
    )
    return Command(0x80, 0x70, 0x00, 0x00, data, le=0x08, name="INIT SAM FOR PURCHASE")


def credit_sam_for_purchase(mac2: bytes) -> Command:
    """``80 72 00 00 04 MAC2`` (§4.3)."""
    if len(mac2) != 4:
        raise ValueError("MAC2 must be 4 bytes")
    return Command(0x80, 0x72, 0x00, 0x00, bytes(mac2), name="CREDIT SAM FOR PURCHASE")


def init_for_descrypt(p1: int, p2: int, factors: Sequence[bytes]) -> Command:
    """``80 1A P1 P2 Lc factors``: P1 = key-usage byte, P2 = key index (§4.4)."""
    if any(len(f) != 8 for f in factors):
        raise ValueError("diversification factors must be 8 bytes each")
    return Command(0x80, 0x1A, p1, p2, b"".join(factors), name="INIT FOR DESCRYPT")


def cipher_data_mac(data: bytes) -> Command:
    """``80 FA 05 00 Lc IV||padded data``: single-block MAC (§4.4)."""
    return Command(0x80, 0xFA, 0x05, 0x00, bytes(data), name="CIPHER DATA (MAC)")


def calculate_m1_keys(data: bytes, p1: int = 0x01, p2: int = 0x01) -> Command:
    """``80 FC P1 P2 Lc data``: 取M1卡密钥 (m1-purse-and-readers.md §3.3; input layout varies)."""
    if not data:
        raise ValueError("80 FC needs diversification data")
    return Command(0x80, 0xFC, p1, p2, bytes(data), name="CALCULATE M1 KEYS")


def verify_security_code(code: bytes) -> Command:
    """``80 CA 00 00 09 code``: CJ/T 166 安全认证识别码 from the card's 80 CA (§4.5)."""
    if len(code) != 9:
        raise ValueError("security code must be 9 bytes")
    return Command(0x80, 0xCA, 0x00, 0x00, bytes(code), name="VERIFY SECURITY CODE")


# -- response parsers (pure) ----------------------------------------------------------------------


def parse_purchase_mac(data: bytes) -> PurchaseMac:
    """80 70 answer: TTC (4) || MAC1 (4). ``data`` has been length-checked by ``require``."""
    return PurchaseMac(ttc=int.from_bytes(data[:4], "big"), mac1=bytes(data[4:8]))


class PsamDriver:
    """The :class:`agent.sam.base.Sam` seam over a PSAM in a :class:`SamSlot`.

    A PSAM may hold several applications (a T-Union and a CJ/T 166 one, §4.1).
    :meth:`select_application` switches between them, re-selecting only when the current
    selection is not the one asked for. EF15/EF16 (serial, terminal number) live in the MF and are
    read once per :meth:`open`; EF17 (purchase-key index) lives in each application and is read
    the first time that application is selected after an open. With
    ``read_ids_before_application=False`` EF15/EF16 are read per application too.
    """

    def __init__(self, slot: SamSlot, config: PsamConfig | None = None) -> None:
        self.slot = slot
        self.config = config or PsamConfig()
        self._terminal_number: bytes | None = None
        self._serial: bytes | None = None
        self._ef17: dict[ApplicationPath, bytes] = {}
        self._app_ids: dict[ApplicationPath, tuple[bytes | None, bytes]] = {}
        self._current: ApplicationPath | None = None
        self._lost = False
        self._opened = False
        self.atr = b""
        self.selects = 0  # application selections made (for tests and status)

    # -- opening ------------------------------------------------------------------------------

    def open(self) -> None:
        """Reset the PSAM, select its application, read EF15/EF16/EF17 (§4.1)."""
        self._opened = False
        self._lost = False
        self._terminal_number = self._serial = None
        self._ef17.clear()
        self._app_ids.clear()
        self._current = None
        try:
            self.atr = self.slot.reset()
        except (SamMuteError, ReaderError):
            self._lost = True
            raise
        cfg = self.config
        if cfg.select_mf_first:
            self._exchange(select_mf())
        if cfg.read_ids_before_application:
            self._read_ids()
        self._select_path(cfg.application)
        log.info(
            "psam.opened",
            slot=self.slot.name,
            serial=self.serial,
            terminal=self.terminal_number.hex().upper(),
            purchase_key_index=self.purchase_key_index,
        )
        self._opened = True

    @property
    def is_open(self) -> bool:
        """Opened and not lost since (a lost PSAM is re-opened before its next command)."""
        return self._opened and not self._lost

    @property
    def known_identity(self) -> tuple[str | None, str | None]:
        """(serial, terminal number) in hex as last read, without any APDU (for status)."""
        terminal = self._terminal_number.hex().upper() if self._terminal_number else None
        serial = self._serial.hex().upper() if self._serial is not None else terminal
        return serial, terminal

    @property
    def current_application(self) -> ApplicationPath | None:
        return self._current

    def select_application(self, path: ApplicationPath) -> None:
        """Make ``path`` the selected application; no APDU when it already is (§4.1)."""
        if self._lost:
            self._reopen()
        if self._current == tuple(path):
            return
        if self.config.select_mf_first:
            self._current = None
            self._exchange(select_mf())
        self._select_path(tuple(path))

    def _select_path(self, path: ApplicationPath) -> None:
        self._current = None
        for kind, value in path:
            self._exchange(select_by_name(value) if kind == "aid" else select_by_fid(value))
        self.selects += 1
        if not self.config.read_ids_before_application:
            if path not in self._app_ids:
                self._read_ids()
                assert self._terminal_number is not None
                self._app_ids[path] = (self._serial, self._terminal_number)
            self._serial, self._terminal_number = self._app_ids[path]
        if path not in self._ef17:
            self._ef17[path] = self._exchange(read_binary_sfi(EF17_SFI, EF17_LENGTH), min_length=1)
        self._current = path
        log.debug("psam.application_selected", slot=self.slot.name, application=describe_path(path))

    def _read_ids(self) -> None:
        if self.config.read_serial:
            ef15 = self._exchange(read_binary_sfi(EF15_SFI, EF15_LENGTH), min_length=10)
            self._serial = ef15[:10]
        self._terminal_number = self._exchange(
            read_binary_sfi(EF16_SFI, EF16_LENGTH), length=EF16_LENGTH
        )

    # -- Sam protocol ---------------------------------------------------------------------------

    @property
    def terminal_number(self) -> bytes:
        if self._terminal_number is None and self._lost:
            self._reopen()
        if self._terminal_number is None:
            raise SamError("PSAM not opened: terminal number (EF16) unknown")
        return self._terminal_number

    @property
    def serial(self) -> str:
        if self._serial is not None:
            return self._serial.hex().upper()
        # Without EF15 the terminal number is the best identifier left.
        return self.terminal_number.hex().upper()

    @property
    def purchase_key_index(self) -> int:
        """EF17 byte 0 of the selected application."""
        if self._current is None and self._lost:
            self._reopen()
        ef17 = self._ef17.get(self._current) if self._current is not None else None
        if ef17 is None:
            raise SamError("PSAM not opened: EF17 (purchase key index) unknown")
        return ef17[0]

    def init_for_purchase(self, request: PurchaseMacRequest) -> PurchaseMac:
        try:
            command = init_sam_for_purchase(request)
        except (ValueError, OverflowError) as exc:
            raise SamProtocolError(f"INIT SAM FOR PURCHASE: bad request: {exc}") from exc
        return parse_purchase_mac(self._exchange(command, length=8))

    def credit_for_purchase(self, mac2: bytes) -> None:
        try:
            command = credit_sam_for_purchase(mac2)
        except ValueError as exc:
            raise SamProtocolError(f"CREDIT SAM FOR PURCHASE: {exc}") from exc
        self._exchange(command, length=0)

    def cipher_init(self, p1: int, p2: int, factors: Sequence[bytes]) -> None:
        try:
            command = init_for_descrypt(p1, p2, factors)
        except ValueError as exc:
            raise SamProtocolError(f"INIT FOR DESCRYPT: {exc}") from exc
        self._exchange(command, length=0)

    def cipher_mac(self, data: bytes) -> bytes:
        """80 FA 05 00: returns the first 4 bytes of the PSAM's MAC answer."""
        return self._exchange(cipher_data_mac(data), min_length=4)[:4]

    def calculate_m1_keys(self, data: bytes, *, p1: int = 0x01, p2: int = 0x01) -> bytes:
        """80 FC: 6 bytes per requested sector; the caller checks the count."""
        try:
            command = calculate_m1_keys(data, p1, p2)
        except ValueError as exc:
            raise SamProtocolError(f"CALCULATE M1 KEYS: {exc}") from exc
        return self._exchange(command, min_length=6)

    def verify_security_code(self, code: bytes) -> None:
        try:
            command = verify_security_code(code)
        except ValueError as exc:
            raise SamProtocolError(f"VERIFY SECURITY CODE: {exc}") from exc
        self._exchange(command, length=0)

    def close(self) -> None:
        self.slot.close()

    # -- transport ------------------------------------------------------------------------------

    def _exchange(
        self, command: Command, *, length: int | None = None, min_length: int | None = None
    ) -> bytes:
        """Send, follow T=0 ``61xx`` / ``6Cxx`` answers, check SW and length.

        A SAM that went mute (or a slot that failed) is reset and re-opened before the next
        command: its session state is gone by then, which 80 72 callers tolerate.
        """
        if self._lost:
            self._reopen()
        try:
            return self._exchange_once(command, length=length, min_length=min_length)
        except (SamMuteError, ReaderError):
            self._lost = True
            raise

    def _reopen(self) -> None:
        """Re-open a lost SAM; if that fails as well, it stays lost for the next attempt."""
        self.open()

    def _exchange_once(
        self, command: Command, *, length: int | None, min_length: int | None
    ) -> bytes:
        response = parse_response(self.slot.transmit(command.to_bytes()), command, Party.SAM)
        if response.sw >> 8 == 0x6C:
            retry = Command(
                command.cla, command.ins, command.p1, command.p2, command.data,
                le=response.sw & 0xFF, name=command.name,
            )  # fmt: skip
            response = parse_response(self.slot.transmit(retry.to_bytes()), command, Party.SAM)
        data = b""
        for _ in range(16):  # bounded: a misbehaving SAM must not loop us forever
            if response.sw >> 8 != 0x61:
                break
            data += response.data
            follow = get_response(response.sw & 0xFF)
            response = parse_response(self.slot.transmit(follow.to_bytes()), command, Party.SAM)
        else:
            raise SamProtocolError(f"{command.label}: endless 61xx chain")
        if data:
            response = Response(data + response.data, response.sw)
        return require(response, command, Party.SAM, length=length, min_length=min_length)
