"""A PSAM simulator: the APDU front-end of :class:`agent.sam.software.SamCore` (cpu-purse.md §8).

Files (§4.1): MF 3F00 (DF name "1PAY.SYS.DDF01") holding EF15 (serial, 14 bytes) and EF16
(terminal number, 6 bytes), and purchase applications (ADFs), each with its own key table, TTC
(EF19) and EF17 (25 bytes, purchase key index in byte 0). EF15/EF16 are readable only while the MF
is current unless ``mf_files_visible_in_application``. Purchase commands need an application
selected (6985 otherwise, L).

By default there is one lenient application answering to every name: AID
A000000632 || "MOT.CPSAM01" (T-Union, S3), FID 8011 (S2), FID 1001 and name "建设部" (GBK
BD A8 C9 E8 B2 BF, CJ/T 166). ``applications=[tunion_application(core1),
cjt166_application(core2)]`` (or :func:`multi_application_psam`) models a real PSAM instead: a
T-Union ADF (AID / FID 8011, no 80 CA: 6985) and a CJ/T 166 ADF (FID 1001 / "建设部", with 80 CA),
each knowing only its own keys, so a card under the wrong application fails its 80 70 (6A88, key
not found) or 80 CA (6985). :func:`tunion_psam` / :func:`cjt166_psam` are single-application
PSAMs of each kind.

Timing model (``modelled_seconds``): contact T=0 at 9600 baud — about 1 ms per byte in either
direction (10 bits per character) plus 3 ms of processing per command.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from agent.apdu import Command
from agent.crypto import CryptoError, bcd_decode
from agent.errors import SamStatusError
from agent.sam.base import PurchaseMacRequest
from agent.sam.software import SamCore
from tests.fake_reader.faults import CardTorn, FaultSchedule, corrupt

log = structlog.get_logger(__name__)

TUNION_PSAM_AID = bytes.fromhex("A000000632") + b"MOT.CPSAM01"
CJT166_PSAM_NAME = bytes.fromhex("BDA8C9E8B2BF")  # GBK "建设部"
APPLICATION_FIDS = (bytes.fromhex("8011"), bytes.fromhex("1001"))
MF_FID = bytes.fromhex("3F00")
MF_NAME = b"1PAY.SYS.DDF01"
DEFAULT_ATR = bytes.fromhex("3B6900008131FE4A00000000")

PER_BYTE_S = 0.001
PROCESSING_S = 0.003

SW_OK = b"\x90\x00"


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


@dataclass
class PsamApplication:
    """One application (ADF) of a simulated PSAM: its key table / TTC / key index live in
    ``core``; it is selected by any of ``names`` (DF name) or ``fids``. ``security_code``: it
    answers 80 CA (the CJ/T 166 application); otherwise 80 CA gets 6985."""

    name: str
    core: SamCore
    names: tuple[bytes, ...] = ()
    fids: tuple[bytes, ...] = ()
    security_code: bool = True
    ef17: bytes = b""  # filled by SimulatedPsam from core.purchase_key_index when empty


def tunion_application(core: SamCore) -> PsamApplication:
    """The JT/T 978 T-Union PSAM application: AID A000000632 || "MOT.CPSAM01", FID 8011."""
    return PsamApplication(
        "tunion", core, names=(TUNION_PSAM_AID,), fids=(APPLICATION_FIDS[0],), security_code=False
    )


def cjt166_application(core: SamCore) -> PsamApplication:
    """The CJ/T 166 PSAM application: FID 1001, name "建设部"; it verifies 80 CA codes."""
    return PsamApplication(
        "cjt166", core, names=(CJT166_PSAM_NAME,), fids=(APPLICATION_FIDS[1],), security_code=True
    )


class SimulatedPsam:
    """A PSAM answering APDUs; all key logic lives in the wrapped :class:`SamCore`."""

    def __init__(
        self,
        core: SamCore,
        *,
        ef15_tail: bytes = b"\x01\x01\x01\x01",
        issuer_id: bytes = bytes.fromhex("0000000000000001"),
        receiver_id: bytes = bytes.fromhex("0000000000000001"),
        start_date: bytes = bytes.fromhex("20200101"),
        expiry_date: bytes = bytes.fromhex("20401231"),
        atr: bytes = DEFAULT_ATR,
        mf_files_visible_in_application: bool = False,
        t0_get_response: bool = False,
        rejected_security_codes: frozenset[bytes] = frozenset(),
        applications: Sequence[PsamApplication] | None = None,
    ) -> None:
        self.mf_core = core  # EF15 / EF16 of the MF
        if applications is None:
            applications = [
                PsamApplication(
                    "purchase",
                    core,
                    names=(TUNION_PSAM_AID, CJT166_PSAM_NAME),
                    fids=APPLICATION_FIDS,
                )
            ]
        if not applications:
            raise ValueError("a PSAM needs at least one application")
        for app in applications:
            if (app.core.terminal_number, app.core.serial) != (core.terminal_number, core.serial):
                raise ValueError(f"application {app.name}: EF15/EF16 live in the MF, one per PSAM")
            if not app.ef17:
                # §4.1 EF17: key index (1) || issuer (8) || receiver (8) || start (4) || expiry (4)
                app.ef17 = (
                    bytes((app.core.purchase_key_index,))
                    + bytes(issuer_id)
                    + bytes(receiver_id)
                    + bytes(start_date)
                    + bytes(expiry_date)
                )
        self.applications = list(applications)
        self._app = self.applications[0]
        # §4.1 EF15: serial (10) || version (1) || key-card type (1) || FCI data (2)
        self.ef15 = core.serial + bytes(ef15_tail)
        self.atr = bytes(atr)
        self.mf_files_visible_in_application = mf_files_visible_in_application
        self.t0_get_response = t0_get_response
        self.rejected_security_codes = rejected_security_codes
        self.security_codes: list[bytes] = []
        self.faults = FaultSchedule()
        self.modelled_seconds = 0.0
        self.internal_errors: list[BaseException] = []
        self.commands: list[bytes] = []
        self._command_count = 0
        self._mute = False
        self._current: Literal["mf", "app"] = "mf"
        self._held: bytes = b""

    @property
    def core(self) -> SamCore:
        """The selected application's core (the first application's while the MF is current)."""
        return self._app.core

    @property
    def ef17(self) -> bytes:
        return self._app.ef17

    @property
    def selected_application(self) -> str | None:
        """The name of the selected application, ``None`` while the MF is current."""
        return self._app.name if self._current == "app" else None

    def application(self, name: str) -> PsamApplication:
        for app in self.applications:
            if app.name == name:
                return app
        raise KeyError(name)

    def reset(self) -> bytes:
        """Power cycle: RAM (current DF, SESPK, temporary key) is lost; answer the ATR."""
        self._mute = False
        self._current = "mf"
        self._app = self.applications[0]
        self._held = b""
        for app in self.applications:
            app.core.clear_session()
        return self.atr

    def reset_command_count(self) -> None:
        self._command_count = 0

    def process(self, apdu: bytes) -> bytes:
        """Answer one command APDU (data + SW). Raises only :class:`CardTorn` (mute SAM)."""
        self._command_count += 1
        raw = bytes(apdu)
        self.commands.append(raw)
        fault = self.faults.pop(self._command_count)
        if self._mute or (fault is not None and fault.kind in ("tear_before", "mute")):
            if fault is not None and fault.kind == "mute":
                self._mute = True
            raise CardTorn(f"PSAM silent at command {self._command_count}")
        try:
            response = self._dispatch(raw)
        except Exception as exc:  # a simulator bug must not look like a mute SAM
            self.internal_errors.append(exc)
            log.exception("psam.internal_error", apdu=raw.hex().upper())
            response = _sw(0x6F00)
        is_get_response = raw[:2] == b"\x00\xc0"
        if (
            self.t0_get_response
            and not is_get_response
            and len(response) > 2
            and response[-2:] == SW_OK
        ):
            self._held = response[:-2]
            response = bytes((0x61, len(self._held)))
        self.modelled_seconds += PROCESSING_S + PER_BYTE_S * (len(raw) + len(response))
        if fault is not None and fault.kind == "tear_after":
            raise CardTorn(f"PSAM answer lost at command {self._command_count}")
        if fault is not None and fault.kind == "corrupt_response":
            response = corrupt(response)
        return response

    def _dispatch(self, raw: bytes) -> bytes:
        try:
            cmd = Command.from_bytes(raw)
        except ValueError:
            return _sw(0x6700)
        held, self._held = self._held, b""
        key = (cmd.cla, cmd.ins)
        if key == (0x00, 0xC0):
            if not held:
                return _sw(0x6985)
            if cmd.le not in (len(held), 256):
                self._held = held
                return _sw(0x6C00 | len(held))
            return held + SW_OK
        handlers = {
            (0x00, 0xA4): self._select,
            (0x00, 0xB0): self._read_binary,
            (0x80, 0x70): self._init_for_purchase,
            (0x80, 0x72): self._credit_for_purchase,
            (0x80, 0x1A): self._init_for_descrypt,
            (0x80, 0xFA): self._cipher_data,
            (0x80, 0xCA): self._security_code,
            (0x80, 0xFC): self._calculate_m1_keys,
        }
        handler = handlers.get(key)
        if handler is None:
            return _sw(0x6E00 if cmd.cla not in (0x00, 0x80) else 0x6D00)
        try:
            return handler(cmd)
        except SamStatusError as exc:
            return _sw(exc.sw)

    # -- files (§4.1) ---------------------------------------------------------------------------

    def _select(self, cmd: Command) -> bytes:
        if cmd.p2 not in (0x00, 0x0C):
            return _sw(0x6A86)
        if cmd.p1 == 0x00:
            if len(cmd.data) != 2:
                return _sw(0x6700)
            if cmd.data == MF_FID:
                self._current = "mf"
                return SW_OK
            return self._select_application(lambda app: cmd.data in app.fids)
        if cmd.p1 == 0x04:
            if cmd.data == MF_NAME:
                self._current = "mf"
                return SW_OK
            return self._select_application(lambda app: cmd.data in app.names)
        return _sw(0x6A86)

    def _select_application(self, matches: Callable[[PsamApplication], bool]) -> bytes:
        """A failed SELECT leaves the current DF as it was (6A82, file not found)."""
        for app in self.applications:
            if matches(app):
                if app is not self._app:
                    for other in self.applications:
                        other.core.clear_session()  # a new DF: session keys are gone
                self._app = app
                self._current = "app"
                return SW_OK
        return _sw(0x6A82)

    def _read_binary(self, cmd: Command) -> bytes:
        if cmd.data:
            return _sw(0x6700)
        if not cmd.p1 & 0x80:
            return _sw(0x6986)
        sfi = cmd.p1 & 0x1F
        mf_visible = self._current == "mf" or self.mf_files_visible_in_application
        content: bytes | None = None
        if sfi == 0x15 and mf_visible:
            content = self.ef15
        elif sfi == 0x16 and mf_visible:
            content = self.mf_core.terminal_number
        elif sfi == 0x17 and self._current == "app":
            content = self.ef17
        if content is None:
            return _sw(0x6A82)
        rest = content[cmd.p2 :]
        if cmd.p2 > len(content):
            return _sw(0x6B00)
        if cmd.le is None or cmd.le == 256:
            return rest + SW_OK
        if cmd.le > len(rest):
            return _sw(0x6C00 | len(rest))
        return rest[: cmd.le] + SW_OK

    # -- purchase (§4.2, §4.3) -------------------------------------------------------------------

    def _init_for_purchase(self, cmd: Command) -> bytes:
        if cmd.p1 or cmd.p2:
            return _sw(0x6A86)
        data = cmd.data
        # Lc = 14 + 8N (§4.2); N is checked against the key's levels by the core.
        if len(data) < 0x14 + 8 or (len(data) - 0x14) % 8:
            return _sw(0x6700)
        if self._current != "app":
            return _sw(0x6985)
        try:
            digits = bcd_decode(data[11:18])
            when = dt.datetime(  # wall-clock fields, as sent by the terminal
                int(digits[0:4]),
                int(digits[4:6]),
                int(digits[6:8]),
                int(digits[8:10]),
                int(digits[10:12]),
                int(digits[12:14]),
            )
        except (CryptoError, ValueError):
            return _sw(0x6A80)
        request = PurchaseMacRequest(
            card_random=data[0:4],
            card_counter=int.from_bytes(data[4:6], "big"),
            amount=int.from_bytes(data[6:10], "big"),
            transaction_type=data[10],
            when=when,
            key_version=data[18],
            algorithm=data[19],
            factors=tuple(data[i : i + 8] for i in range(0x14, len(data), 8)),
        )
        result = self.core.init_for_purchase(request)
        return result.ttc.to_bytes(4, "big") + result.mac1 + SW_OK

    def _credit_for_purchase(self, cmd: Command) -> bytes:
        if cmd.p1 or cmd.p2:
            return _sw(0x6A86)
        if len(cmd.data) != 4:
            return _sw(0x6700)
        if self._current != "app":
            return _sw(0x6985)
        self.core.credit_for_purchase(cmd.data)
        return SW_OK

    # -- 80 1A / 80 FA (§4.4), 80 CA (§4.5) -------------------------------------------------------

    def _init_for_descrypt(self, cmd: Command) -> bytes:
        if len(cmd.data) % 8:
            return _sw(0x6700)
        if self._current != "app":
            return _sw(0x6985)
        factors = tuple(cmd.data[i : i + 8] for i in range(0, len(cmd.data), 8))
        self.core.cipher_init(cmd.p1, cmd.p2, factors)
        return SW_OK

    def _cipher_data(self, cmd: Command) -> bytes:
        if cmd.p2 != 0x00:
            return _sw(0x6A86)
        if not cmd.data:
            return _sw(0x6700)
        if cmd.p1 == 0x05:
            return self.core.cipher_mac(cmd.data) + SW_OK
        if cmd.p1 == 0x00:
            return self.core.cipher_encrypt(cmd.data) + SW_OK
        return _sw(0x6A86)  # multi-block modes (07/03/01, 02) are not modelled

    def _calculate_m1_keys(self, cmd: Command) -> bytes:
        """80 FC (M1 spec §3.3): needs the application selected, like the purchase commands."""
        if self._current != "app":
            return _sw(0x6985)
        return self.core.calculate_m1_keys(cmd.data, cmd.p1, cmd.p2) + SW_OK

    def _security_code(self, cmd: Command) -> bytes:
        if cmd.p1 or cmd.p2:
            return _sw(0x6A86)
        if len(cmd.data) != 9:
            return _sw(0x6700)
        if self._current != "app" or not self._app.security_code:
            return _sw(0x6985)  # no application, or one without 80 CA (not CJ/T 166)
        if cmd.data in self.rejected_security_codes:
            return _sw(0x6988)
        self.security_codes.append(cmd.data)
        return SW_OK


def tunion_psam(core: SamCore, **options: object) -> SimulatedPsam:
    """A JT/T 978 PSAM: only the T-Union application."""
    return SimulatedPsam(core, applications=[tunion_application(core)], **options)  # type: ignore[arg-type]


def cjt166_psam(core: SamCore, **options: object) -> SimulatedPsam:
    """A local CJ/T 166 PSAM: only the CJ/T 166 application."""
    return SimulatedPsam(core, applications=[cjt166_application(core)], **options)  # type: ignore[arg-type]


def multi_application_psam(
    tunion_core: SamCore, cjt166_core: SamCore, **options: object
) -> SimulatedPsam:
    """One PSAM with a T-Union and a CJ/T 166 application, each with its own keys and EF17."""
    return SimulatedPsam(
        tunion_core,
        applications=[tunion_application(tunion_core), cjt166_application(cjt166_core)],
        **options,  # type: ignore[arg-type]
    )
