"""The PSAM's behaviour in software (cpu-purse.md §4.2-§4.4, §8), for tests and demos only.

:class:`SamCore` is the key-holding state machine shared by :class:`SoftwareSam` (the agent's
``Sam`` seam without any APDU) and the APDU-level PSAM simulator in ``tests/fake_reader/psam.py``.
Errors are :class:`SamStatusError` carrying the status word a PSAM would answer, so the simulator
can turn them back into APDU status words. Test keys only: production profiles refuse it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from agent import crypto
from agent.apdu import describe_sw
from agent.crypto import Algorithm
from agent.errors import ConfigurationError, SamStatusError
from agent.sam.base import PurchaseMac, PurchaseMacRequest
from agent.sam.keys import KeySet

log = structlog.get_logger(__name__)

# Key-type codes of the 80 1A key-usage byte (low 5 bits), S4's numbering (§4.4). P8 and other
# vendors number them differently: pass ``key_types`` to the constructor.
S4_KEY_TYPES: Mapping[int, str] = {0x02: "purchase", 0x05: "maintenance", 0x0C: "tac"}

INIT_SAM_FOR_PURCHASE = "INIT SAM FOR PURCHASE"
CREDIT_SAM_FOR_PURCHASE = "CREDIT SAM FOR PURCHASE"
INIT_FOR_DESCRYPT = "INIT FOR DESCRYPT"
CIPHER_DATA = "CIPHER DATA"

_MAX_TTC = 0xFFFF_FFFF


CALCULATE_M1_KEYS = "CALCULATE M1 KEYS"
M1_KEY_PREFIX = 12  # city (2) || UID (4) || serial low (2) || card authentication code (4)


def m1_sector_key(master16: bytes, prefix: bytes, sector_id: int) -> bytes:
    """The simulated PSAM's 80 FC algorithm (test only: the real one is not public, M1 §3.3).

    ``3DES_MK(fold8(pad80(prefix || sector id)))[:6]``, fold8 = XOR of the 8-byte blocks.
    """
    padded = crypto.pad80(bytes(prefix) + bytes((sector_id,)), 8)
    folded = bytearray(8)
    for i in range(0, len(padded), 8):
        for j in range(8):
            folded[j] ^= padded[i + j]
    return crypto.tdes_encrypt(master16, bytes(folded))[:6]


def _refuse(command: str, sw: int) -> SamStatusError:
    return SamStatusError(command, sw, describe_sw(sw))


@dataclass(slots=True)
class _PurchaseSession:
    sespk: bytes
    algorithm: Algorithm
    amount: int


@dataclass(slots=True)
class _TempKey:
    key: bytes  # 8 bytes (DES MAC / single DES) or 16 bytes (retail MAC / 3DES / SM4)
    algorithm: Algorithm


class SamCore:
    """Key table, terminal number, TTC and the session state of one PSAM."""

    def __init__(
        self,
        keyset: KeySet,
        terminal_number: bytes,
        serial: bytes,
        *,
        purchase_key_index: int = 1,
        ttc: int = 0,
        on_ttc_change: Callable[[int], None] | None = None,
        key_types: Mapping[int, str] = S4_KEY_TYPES,
        apdu_order_card_first: bool = True,
        sm4_session_key: str = "pad80",
        m1_master: bytes | None = None,
    ) -> None:
        if len(terminal_number) != 6:
            raise ConfigurationError(
                f"terminal number must be 6 bytes (PSAM EF16), got {len(terminal_number)}"
            )
        if len(serial) != 10:
            raise ConfigurationError(f"PSAM serial must be 10 bytes (EF15), got {len(serial)}")
        if not 0 <= purchase_key_index <= 0xFF:
            raise ConfigurationError(
                f"purchase key index must be one byte, got {purchase_key_index}"
            )
        if not 0 <= ttc <= _MAX_TTC:
            raise ConfigurationError(f"TTC must fit in 4 bytes, got {ttc}")
        if sm4_session_key not in crypto.SM4_SESSION_KEY_VARIANTS:
            raise ConfigurationError(
                f"unknown SM4 session-key variant {sm4_session_key!r}; "
                f"known: {', '.join(sorted(crypto.SM4_SESSION_KEY_VARIANTS))}"
            )
        if m1_master is not None and len(m1_master) != 16:
            raise ConfigurationError("the M1 key master must be 16 bytes")
        self._m1_master = None if m1_master is None else bytes(m1_master)
        self.keyset = keyset
        self.terminal_number = bytes(terminal_number)
        self.serial = bytes(serial)
        self.purchase_key_index = purchase_key_index
        self.key_types = dict(key_types)
        self.apdu_order_card_first = apdu_order_card_first
        self.sm4_session_key = sm4_session_key
        self._ttc = ttc
        self._on_ttc_change = on_ttc_change
        self._session: _PurchaseSession | None = None
        self._temp_key: _TempKey | None = None

    def __repr__(self) -> str:
        return (
            f"SamCore(terminal={self.terminal_number.hex().upper()}, "
            f"serial={self.serial.hex().upper()}, ttc={self._ttc}, keys={len(self.keyset)})"
        )

    @property
    def ttc(self) -> int:
        """The terminal transaction sequence that the next 80 70 will use."""
        return self._ttc

    @property
    def has_purchase_session(self) -> bool:
        return self._session is not None

    def clear_session(self) -> None:
        """Forget SESPK and the temporary key (power-off: RAM is lost)."""
        self._session = None
        self._temp_key = None

    # -- 80 70 / 80 72 ------------------------------------------------------------------------

    def init_for_purchase(self, request: PurchaseMacRequest) -> PurchaseMac:
        """INIT SAM FOR PURCHASE (§4.2): MAC1 with the current TTC, then TTC += 1."""
        try:
            algorithm = Algorithm(request.algorithm)
        except ValueError:
            raise _refuse(INIT_SAM_FOR_PURCHASE, 0x6A80) from None
        master = self.keyset.by_version("purchase", request.key_version, algorithm)
        if master is None:
            raise _refuse(INIT_SAM_FOR_PURCHASE, 0x6A88)
        if len(request.factors) != master.levels:
            # Lc must be 14 + 8N for the key's N (§8; SW L).
            raise _refuse(INIT_SAM_FOR_PURCHASE, 0x6700)
        if self._ttc > _MAX_TTC:
            raise _refuse(INIT_SAM_FOR_PURCHASE, 0x9402)
        try:
            dpk = crypto.diversify(
                master.key,
                request.factors,
                algorithm,
                apdu_order_card_first=self.apdu_order_card_first,
            )
            ttc = self._ttc
            sespk = self._session_key(algorithm)(
                dpk, request.card_random, request.card_counter, ttc
            )
            mac1 = crypto.purchase_mac1(
                sespk,
                request.amount,
                request.transaction_type,
                self.terminal_number,
                crypto.datetime7(request.when),
                algorithm,
            )
        except crypto.CryptoError:
            raise _refuse(INIT_SAM_FOR_PURCHASE, 0x6A80) from None
        self._session = _PurchaseSession(sespk, algorithm, request.amount)
        self._set_ttc(ttc + 1)
        log.debug("sam.init_for_purchase", key=master.label, ttc=ttc, amount=request.amount)
        return PurchaseMac(ttc=ttc, mac1=mac1)

    def credit_for_purchase(self, mac2: bytes) -> None:
        """CREDIT SAM FOR PURCHASE (§4.3). SESPK is kept until the next 80 70 (recovery path)."""
        session = self._session
        if session is None or len(mac2) != 4:
            raise _refuse(CREDIT_SAM_FOR_PURCHASE, 0x9302)
        expected = crypto.purchase_mac2(session.sespk, session.amount, session.algorithm)
        if not hmac.compare_digest(expected, bytes(mac2)):
            log.info("sam.mac2_mismatch", amount=session.amount)
            raise _refuse(CREDIT_SAM_FOR_PURCHASE, 0x9302)

    # -- 80 1A / 80 FA ------------------------------------------------------------------------

    def cipher_init(self, usage_code: int, index: int, factors: Sequence[bytes]) -> None:
        """INIT FOR DESCRYPT (§4.4): usage byte = levels (high 3 bits) | key type (low 5 bits)."""
        self._temp_key = None
        levels, key_type = usage_code >> 5, usage_code & 0x1F
        usage = self.key_types.get(key_type)
        if usage is None:
            raise _refuse(INIT_FOR_DESCRYPT, 0x6A86)
        master = self.keyset.by_index(usage, index)
        if master is None:
            raise _refuse(INIT_FOR_DESCRYPT, 0x6A88)
        if len(factors) != levels or any(len(f) != 8 for f in factors):
            raise _refuse(INIT_FOR_DESCRYPT, 0x6700)  # Lc = 8 * levels
        if levels != master.levels:
            raise _refuse(INIT_FOR_DESCRYPT, 0x6A86)
        key = crypto.diversify(
            master.key, factors, master.algorithm, apdu_order_card_first=self.apdu_order_card_first
        )
        if usage == "tac" and master.algorithm == Algorithm.TDES:
            # The PSAM stores MTK so that Div(MTK) = the card's DTK, then XORs halves (§5.5, P4).
            key = crypto.tac_key(key)
        self._temp_key = _TempKey(key, master.algorithm)
        log.debug("sam.cipher_init", key=master.label)

    def cipher_mac(self, iv_and_padded_data: bytes) -> bytes:
        """CIPHER DATA, P1 05 (§4.4): the first block of the data is the IV; the rest is the
        message already 80-padded by the terminal. Returns the 4-byte MAC."""
        temp = self._temp_key
        if temp is None:
            raise _refuse(CIPHER_DATA, 0x6985)
        block = 16 if temp.algorithm == Algorithm.SM4 else 8
        data = bytes(iv_and_padded_data)
        if len(data) < 2 * block or len(data) % block:
            raise _refuse(CIPHER_DATA, 0x6700)
        iv, message = data[:block], data[block:]
        if temp.algorithm == Algorithm.SM4:
            return crypto.sm4_mac(temp.key, message, iv, pad_aligned=False)
        if len(temp.key) == 16:
            return crypto.retail_mac(temp.key, message, iv, pad_aligned=False)
        return crypto.pboc_des_mac(temp.key, message, iv, pad_aligned=False)

    def cipher_encrypt(self, data: bytes) -> bytes:
        """CIPHER DATA, P1 00 (§4.4): ECB encryption with the temporary key."""
        temp = self._temp_key
        if temp is None:
            raise _refuse(CIPHER_DATA, 0x6985)
        encrypt: Callable[[bytes, bytes], bytes]
        if temp.algorithm == Algorithm.SM4:
            block, encrypt = 16, crypto.sm4_encrypt
        elif len(temp.key) == 16:
            block, encrypt = 8, crypto.tdes_encrypt
        else:
            block, encrypt = 8, crypto.des_encrypt
        if not data or len(data) % block:
            raise _refuse(CIPHER_DATA, 0x6700)
        return b"".join(encrypt(temp.key, data[i : i + block]) for i in range(0, len(data), block))

    # -- 80 FC (M1 spec §3.3) ------------------------------------------------------------------

    def calculate_m1_keys(self, data: bytes, p1: int = 0x01, p2: int = 0x01) -> bytes:
        """Sector keys for the ids after the 12-byte prefix (an optional city || FF*6 suffix
        is ignored); 6A88 without an M1 master, 6700 on a short input."""
        if self._m1_master is None:
            raise _refuse(CALCULATE_M1_KEYS, 0x6A88)
        if (p1, p2) != (0x01, 0x01):
            raise _refuse(CALCULATE_M1_KEYS, 0x6A86)
        raw = bytes(data)
        ids = raw[M1_KEY_PREFIX:]
        if len(ids) > 8 and ids[-6:] == b"\xff" * 6:
            ids = ids[:-8]
        if len(raw) <= M1_KEY_PREFIX or not ids:
            raise _refuse(CALCULATE_M1_KEYS, 0x6700)
        prefix = raw[:M1_KEY_PREFIX]
        log.debug("sam.calculate_m1_keys", sectors=len(ids))
        return b"".join(m1_sector_key(self._m1_master, prefix, sid) for sid in ids)

    # -- internals ------------------------------------------------------------------------------

    def _session_key(self, algorithm: Algorithm) -> crypto.SessionKeyFn:
        if algorithm == Algorithm.SM4:
            return crypto.SM4_SESSION_KEY_VARIANTS[self.sm4_session_key]
        return crypto.purchase_session_key_3des

    def _set_ttc(self, value: int) -> None:
        self._ttc = value
        if self._on_ttc_change is not None:
            self._on_ttc_change(value)


class SoftwareSam:
    """The :class:`agent.sam.base.Sam` seam computed by a :class:`SamCore` (test keys only)."""

    def __init__(self, core: SamCore, *, allow_test_keys: bool) -> None:
        if not allow_test_keys:
            raise ConfigurationError(
                "software SAM refused: it holds test keys and must be explicitly allowed"
            )
        self._core = core

    @classmethod
    def for_profile(cls, profile_kind: str, core: SamCore) -> SoftwareSam:
        """Build one for a firmware profile; only ``test`` profiles may use a software SAM."""
        if profile_kind != "test":
            raise ConfigurationError(
                f"software SAM refused: profile '{profile_kind}' is a production profile"
            )
        return cls(core, allow_test_keys=True)

    @property
    def core(self) -> SamCore:
        return self._core

    @property
    def terminal_number(self) -> bytes:
        return self._core.terminal_number

    @property
    def serial(self) -> str:
        return self._core.serial.hex().upper()

    @property
    def purchase_key_index(self) -> int:
        return self._core.purchase_key_index

    def init_for_purchase(self, request: PurchaseMacRequest) -> PurchaseMac:
        return self._core.init_for_purchase(request)

    def credit_for_purchase(self, mac2: bytes) -> None:
        self._core.credit_for_purchase(mac2)

    def cipher_init(self, p1: int, p2: int, factors: Sequence[bytes]) -> None:
        self._core.cipher_init(p1, p2, factors)

    def cipher_mac(self, data: bytes) -> bytes:
        return self._core.cipher_mac(data)

    def calculate_m1_keys(self, data: bytes, *, p1: int = 0x01, p2: int = 0x01) -> bytes:
        return self._core.calculate_m1_keys(data, p1, p2)

    def verify_security_code(self, code: bytes) -> None:
        """80 CA (CJ/T 166): the card's algorithm is not public, so any 9 bytes pass."""
        if len(code) != 9:
            raise SamStatusError("VERIFY SECURITY CODE", 0x6700, "wrong length")

    def close(self) -> None:
        self._core.clear_session()
