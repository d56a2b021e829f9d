"""E-purse cryptography: DES/3DES/SM4 primitives, MACs, key diversification, session keys.

Pure functions, no I/O and no state. Every formula is the one of ``cpu-purse.md`` §5 (section
numbers below refer to that document). The block ciphers come from the ``cryptography`` package;
this module only chains blocks (CBC for MACs) and lays out the MAC inputs.

Conventions (§1): amounts and balances are 4-byte unsigned big-endian, card counters 2 bytes, the
PSAM terminal transaction sequence (TTC) 4 bytes, date/time 7 bytes BCD ``YYYYMMDDhhmmss``, the
terminal number 6 opaque bytes.

Open points kept configurable (§10): padding of block-aligned MAC input (``pad_aligned``, §5.2), the
factor order of multi-level diversification (``apdu_order_card_first``, §5.4), the SM4 session-key
derivations (:data:`SM4_SESSION_KEY_VARIANTS`, :data:`SM4_LOAD_SESSION_KEY_VARIANTS`, §5.6) and the
SM4 MAC/TAC format (§5.3, §5.7).

SM4 load (圈存), what is assumed (no published SM4 e-purse vector or formula was found: the public
sources give SM4 diversification ``SM4_MK(F ‖ ¬F)`` (M, P9) and algorithm id 04 (M, S8, S14) only;
the card commands and MAC inputs are those of 3DES, §3.4, §3.5, §5.7, which are H):
SESLK is 16 bytes, ``SM4_DLK(random4 ‖ onlineCtr2 ‖ 80 00 … 00)`` (``pad80``) or
``SM4_DLK(B ‖ ¬B)`` with ``B = random4 ‖ onlineCtr2 ‖ 80 00`` (``complement``), chosen per card
profile (``[crypto] sm4_load_session_key``); MAC1 and MAC2 are the SM4 CBC-MAC of §5.3 (IV 0,
80-padding to 16 bytes, first 4 bytes of the last block) over the 3DES inputs; the TAC is that MAC
under the 16-byte DTK (an XOR of halves would give 8 bytes, no SM4 key).

No Cipher objects are cached: building one costs microseconds, and a cache would keep session and
card keys alive in process memory after the tap. Each MAC uses a single CBC encryptor for all of its
blocks.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers.algorithms import SM4

try:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - cryptography < 43
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

__all__ = [
    "SM4_LOAD_SESSION_KEY_VARIANTS",
    "SM4_SESSION_KEY_VARIANTS",
    "Algorithm",
    "CryptoError",
    "SessionKeyFn",
    "application_block_mac",
    "bcd_decode",
    "bcd_encode",
    "datetime7",
    "des_decrypt",
    "des_encrypt",
    "diversify",
    "diversify_3des",
    "diversify_sm4",
    "load_mac1",
    "load_mac2",
    "load_session_key",
    "load_tac",
    "pad80",
    "pboc_des_mac",
    "purchase_mac1",
    "purchase_mac2",
    "purchase_session_key_3des",
    "purchase_session_key_sm4_pad80",
    "purchase_tac",
    "retail_mac",
    "session_mac",
    "sm4_encrypt",
    "sm4_mac",
    "tac_key",
    "tdes_decrypt",
    "tdes_encrypt",
]

DES_BLOCK = 8
SM4_BLOCK = 16
MAC_LEN = 4

_MAX_U16 = 0xFFFF
_MAX_U32 = 0xFFFF_FFFF

# APPLICATION BLOCK header, the data of its MAC (§3.8, §5.7).
_APPLICATION_BLOCK_HEADER = bytes.fromhex("841E000004")


class Algorithm(enum.IntEnum):
    """Algorithm identifier of the INIT responses (§5.6): 00 = 3DES, 04 = SM4."""

    TDES = 0x00
    SM4 = 0x04


class CryptoError(ValueError):
    """A key, block, IV or field given to a crypto function has the wrong type, length or range."""


# --------------------------------------------------------------------------------------------------
# Input checks


def _octets(name: str, value: bytes, length: int) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise CryptoError(f"{name} must be bytes, got {type(value).__name__}")
    data = bytes(value)
    if len(data) != length:
        raise CryptoError(f"{name} must be {length} bytes, got {len(data)}")
    return data


def _any_octets(name: str, value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise CryptoError(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _uint(name: str, value: int, size: int) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CryptoError(f"{name} must be an int, got {type(value).__name__}")
    limit = (1 << (8 * size)) - 1
    if not 0 <= value <= limit:
        raise CryptoError(f"{name} must be in 0..{limit:#x} ({size} bytes), got {value}")
    return value.to_bytes(size, "big")


def _amount(name: str, value: int) -> bytes:
    return _uint(name, value, 4)


def _txn_type(value: int) -> bytes:
    return _uint("transaction type", value, 1)


# --------------------------------------------------------------------------------------------------
# Primitives (§5.1)


def _des_algorithm(key8: bytes) -> TripleDES:
    # Single DES = 3DES with K1 = K2 = K3 (§5.1 implementation note). 24-byte key: the package
    # deprecates 8- and 16-byte TripleDES keys.
    return TripleDES(key8 * 3)


def _tdes_algorithm(key16: bytes) -> TripleDES:
    # Two-key EDE, K = KL || KR -> KL || KR || KL (§5.1).
    return TripleDES(key16 + key16[:8])


def _ecb_encrypt(algorithm: TripleDES | SM4, data: bytes) -> bytes:
    enc = Cipher(algorithm, modes.ECB()).encryptor()  # noqa: S305 - single blocks / ECB by spec §5.1
    return enc.update(data) + enc.finalize()


def _ecb_decrypt(algorithm: TripleDES | SM4, data: bytes) -> bytes:
    dec = Cipher(algorithm, modes.ECB()).decryptor()  # noqa: S305 - single blocks / ECB by spec §5.1
    return dec.update(data) + dec.finalize()


def _cbc_last_block(algorithm: TripleDES | SM4, iv: bytes, padded: bytes, block: int) -> bytes:
    # CBC-MAC core (§5.3): y0 = IV, yi = E_K(y(i-1) XOR Di); returns yn. One encryptor per MAC.
    enc = Cipher(algorithm, modes.CBC(iv)).encryptor()
    out = enc.update(padded) + enc.finalize()
    return out[-block:]


def des_encrypt(key8: bytes, block8: bytes) -> bytes:
    """Single DES (FIPS 46), one 8-byte block, ECB (§5.1)."""
    key = _octets("DES key", key8, 8)
    return _ecb_encrypt(_des_algorithm(key), _octets("DES block", block8, DES_BLOCK))


def des_decrypt(key8: bytes, block8: bytes) -> bytes:
    """Single DES decryption, one 8-byte block, ECB (§5.1)."""
    key = _octets("DES key", key8, 8)
    return _ecb_decrypt(_des_algorithm(key), _octets("DES block", block8, DES_BLOCK))


def tdes_encrypt(key16: bytes, block8: bytes) -> bytes:
    """Two-key Triple DES EDE ``E_KL(D_KR(E_KL(x)))``, one block, ECB (§5.1)."""
    key = _octets("3DES key", key16, 16)
    return _ecb_encrypt(_tdes_algorithm(key), _octets("3DES block", block8, DES_BLOCK))


def tdes_decrypt(key16: bytes, block8: bytes) -> bytes:
    """Two-key Triple DES decryption ``D_KL(E_KR(D_KL(x)))``, one block, ECB (§5.1)."""
    key = _octets("3DES key", key16, 16)
    return _ecb_decrypt(_tdes_algorithm(key), _octets("3DES block", block8, DES_BLOCK))


def sm4_encrypt(key16: bytes, block16: bytes) -> bytes:
    """SM4 (GB/T 32907), one 16-byte block, ECB (§5.1)."""
    key = _octets("SM4 key", key16, 16)
    return _ecb_encrypt(SM4(key), _octets("SM4 block", block16, SM4_BLOCK))


# --------------------------------------------------------------------------------------------------
# Padding (§5.2) and MACs (§5.3)


def pad80(data: bytes, block: int = DES_BLOCK, *, pad_aligned: bool = True) -> bytes:
    """ISO/IEC 9797-1 padding method 2 (§5.2): append ``80`` then ``00`` up to a multiple of block.

    With ``pad_aligned=False`` input whose length is already a multiple of ``block`` is returned
    unchanged (S4 ``CalculateMac`` behaviour); the default appends a whole ``80 00..00`` block
    (§5.2 open point, §10 item 13).
    """
    raw = _any_octets("data", data)
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise CryptoError(f"block size must be a positive int, got {block!r}")
    if not pad_aligned and len(raw) % block == 0:
        return raw
    raw += b"\x80"
    return raw + bytes(-len(raw) % block)


def _padded_message(data: bytes, block: int, pad_aligned: bool) -> bytes:
    padded = pad80(data, block, pad_aligned=pad_aligned)
    if not padded:
        raise CryptoError("cannot MAC empty data without padding (pad_aligned=False)")
    return padded


def pboc_des_mac(
    key8: bytes, data: bytes, iv: bytes = bytes(8), *, pad_aligned: bool = True
) -> bytes:
    """PBOC single-DES CBC-MAC (§5.3, §5.9 ``MAC_DES``): first 4 bytes of the last CBC block."""
    key = _octets("DES MAC key", key8, 8)
    init = _octets("DES MAC IV", iv, DES_BLOCK)
    padded = _padded_message(data, DES_BLOCK, pad_aligned)
    return _cbc_last_block(_des_algorithm(key), init, padded, DES_BLOCK)[:MAC_LEN]


def retail_mac(
    key16: bytes, data: bytes, iv: bytes = bytes(8), *, pad_aligned: bool = True
) -> bytes:
    """ISO/IEC 9797-1 MAC algorithm 3 (§5.3, §5.9 ``MAC_retail``).

    CBC-DES with KL over the padded data from ``iv``, then ``y = E_KL(D_KR(yn))``; first 4 bytes.
    """
    key = _octets("retail MAC key", key16, 16)
    init = _octets("retail MAC IV", iv, DES_BLOCK)
    padded = _padded_message(data, DES_BLOCK, pad_aligned)
    kl = _des_algorithm(key[:8])
    y = _cbc_last_block(kl, init, padded, DES_BLOCK)
    # Output transformation (§5.3): y <- DES_KL(DES^-1_KR(yn)).
    y = _ecb_encrypt(kl, _ecb_decrypt(_des_algorithm(key[8:]), y))
    return y[:MAC_LEN]


def sm4_mac(key16: bytes, data: bytes, iv: bytes = bytes(16), *, pad_aligned: bool = True) -> bytes:
    """SM4 CBC-MAC (§5.3; format UNCONFIRMED): 80-padding to 16, first 4 bytes of the last block."""
    key = _octets("SM4 MAC key", key16, 16)
    init = _octets("SM4 MAC IV", iv, SM4_BLOCK)
    padded = _padded_message(data, SM4_BLOCK, pad_aligned)
    return _cbc_last_block(SM4(key), init, padded, SM4_BLOCK)[:MAC_LEN]


# --------------------------------------------------------------------------------------------------
# Key diversification (§5.4)


def _complement(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data)


def diversify_3des(master16: bytes, factor8: bytes) -> bytes:
    """``Div3DES(MK, F) = 3DES_MK(F) || 3DES_MK(~F)`` (§5.4) -> 16-byte key."""
    key = _octets("3DES master key", master16, 16)
    factor = _octets("diversification factor", factor8, 8)
    # Two independent ECB blocks through one encryptor.
    return _ecb_encrypt(_tdes_algorithm(key), factor + _complement(factor))


def diversify_sm4(master16: bytes, factor8: bytes) -> bytes:
    """``DivSM4(MK, F) = SM4_MK(F || ~F)`` (§5.4) -> 16-byte key."""
    key = _octets("SM4 master key", master16, 16)
    factor = _octets("diversification factor", factor8, 8)
    return _ecb_encrypt(SM4(key), factor + _complement(factor))


def diversify(
    master: bytes,
    factors: Sequence[bytes],
    algorithm: Algorithm,
    *,
    apdu_order_card_first: bool = True,
) -> bytes:
    """Multi-level diversification (§5.4, §5.9).

    ``factors`` are given as listed in the PSAM APDU (``80 70``, ``80 1A``): card level first. By
    default they are applied from the last (highest level) to the first (card level), so
    ``[F_card, F_issuer]`` gives ``Div(Div(MK, F_issuer), F_card)``. ``apdu_order_card_first=False``
    applies them in listed order instead (open point, §10 item 2). No factors: the master itself.
    """
    if algorithm == Algorithm.TDES:
        step: Callable[[bytes, bytes], bytes] = diversify_3des
    elif algorithm == Algorithm.SM4:
        step = diversify_sm4
    else:
        raise CryptoError(f"unknown algorithm {algorithm!r}")
    key = _octets("master key", master, 16)
    ordered = list(reversed(factors)) if apdu_order_card_first else list(factors)
    for factor in ordered:
        key = step(key, factor)
    return key


def tac_key(dtk16: bytes) -> bytes:
    """8-byte TAC key ``DTK[0..7] XOR DTK[8..15]`` (§5.5, §5.9)."""
    dtk = _octets("DTK", dtk16, 16)
    return bytes(a ^ b for a, b in zip(dtk[:8], dtk[8:], strict=True))


# --------------------------------------------------------------------------------------------------
# Session keys (§5.6)

SessionKeyFn = Callable[[bytes, bytes, int, int], bytes]
"""``(dpk, random4, counter, ttc) -> session key`` — a purchase session-key derivation."""


def purchase_session_key_3des(dpk: bytes, random4: bytes, counter: int, ttc: int) -> bytes:
    """``SESPK = 3DES_DPK(random4 || ctr2 || TTC[2..3])`` (§5.6) -> 8 bytes."""
    key = _octets("DPK", dpk, 16)
    ttc4 = _uint("terminal transaction sequence", ttc, 4)
    block = _octets("card random", random4, 4) + _uint("offline counter", counter, 2) + ttc4[2:]
    return _ecb_encrypt(_tdes_algorithm(key), block)


def purchase_session_key_sm4_pad80(dpk: bytes, random4: bytes, counter: int, ttc: int) -> bytes:
    """UNCONFIRMED SM4 variant (§5.6): ``SM4_DPK(random4 || ctr2 || ttc2 || 80 00..00)``, 16 bytes.

    ``ttc2`` is the last two bytes of the 4-byte TTC, as in the 3DES form.
    """
    key = _octets("DPK", dpk, 16)
    ttc4 = _uint("terminal transaction sequence", ttc, 4)
    block = _octets("card random", random4, 4) + _uint("offline counter", counter, 2) + ttc4[2:]
    return _ecb_encrypt(SM4(key), pad80(block, SM4_BLOCK))


SM4_SESSION_KEY_VARIANTS: dict[str, SessionKeyFn] = {
    "pad80": purchase_session_key_sm4_pad80,
}
"""SM4 purchase session-key derivations by name; a PSAM/card profile picks one (§10 item 1)."""


LoadSessionKeyFn = Callable[[bytes, bytes, int], bytes]
"""``(dlk, random4, online counter) -> SM4 SESLK`` — an SM4 load session-key derivation."""


def load_session_key_sm4_pad80(dlk: bytes, random4: bytes, online_counter: int) -> bytes:
    """UNCONFIRMED SM4 variant ``pad80`` (§5.6, §10 item 1): the 3DES block ``random4 ‖ ctr2 ‖
    80 00`` padded with zeros to 16 bytes (= ``pad80(random4 ‖ ctr2)``), SM4 under DLK."""
    key = _octets("DLK", dlk, 16)
    block = _octets("card random", random4, 4) + _uint("online counter", online_counter, 2)
    return _ecb_encrypt(SM4(key), pad80(block, SM4_BLOCK))


def load_session_key_sm4_complement(dlk: bytes, random4: bytes, online_counter: int) -> bytes:
    """UNCONFIRMED SM4 variant ``complement`` (§5.6, §10 item 1): the 3DES block ``B = random4 ‖
    ctr2 ‖ 80 00`` completed to 16 bytes by its complement, ``SM4_DLK(B ‖ ¬B)``, the way SM4
    diversification completes an 8-byte factor (§5.4)."""
    key = _octets("DLK", dlk, 16)
    block = (
        _octets("card random", random4, 4)
        + _uint("online counter", online_counter, 2)
        + b"\x80\x00"
    )
    return _ecb_encrypt(SM4(key), block + _complement(block))


SM4_LOAD_SESSION_KEY_VARIANTS: dict[str, LoadSessionKeyFn] = {
    "pad80": load_session_key_sm4_pad80,
    "complement": load_session_key_sm4_complement,
}
"""SM4 load session-key derivations by name (profile ``crypto.sm4_load_session_key``): no
public source gives the SM4 form of SESLK, so it is a setting of the card's profile."""


def load_session_key(
    dlk: bytes,
    random4: bytes,
    online_counter: int,
    algorithm: Algorithm = Algorithm.TDES,
    *,
    sm4_variant: str = "pad80",
) -> bytes:
    """``SESLK = 3DES_DLK(random4 || onlineCtr2 || 80 00)`` (§5.6) -> 8 bytes.

    SM4 (UNCONFIRMED, §5.6 gives no load form): the ``sm4_variant`` of
    :data:`SM4_LOAD_SESSION_KEY_VARIANTS` (default ``pad80``, the purchase variant's shape:
    ``SM4_DLK(random4 || onlineCtr2 || 80 00 .. 00)``) -> 16 bytes.
    """
    key = _octets("DLK", dlk, 16)
    block = _octets("card random", random4, 4) + _uint("online counter", online_counter, 2)
    if algorithm == Algorithm.TDES:
        return _ecb_encrypt(_tdes_algorithm(key), block + b"\x80\x00")
    if algorithm == Algorithm.SM4:
        variant = SM4_LOAD_SESSION_KEY_VARIANTS.get(sm4_variant)
        if variant is None:
            raise CryptoError(
                f"unknown SM4 load session-key variant {sm4_variant!r}; known: "
                f"{', '.join(sorted(SM4_LOAD_SESSION_KEY_VARIANTS))}"
            )
        return variant(key, random4, online_counter)
    raise CryptoError(f"unknown algorithm {algorithm!r}")


def session_mac(session_key: bytes, data: bytes, algorithm: Algorithm) -> bytes:
    """MAC under a session key: TDES -> ``MAC_DES`` with 8-byte key; SM4 -> SM4 MAC, 16-byte key."""
    if algorithm == Algorithm.TDES:
        return pboc_des_mac(session_key, data)
    if algorithm == Algorithm.SM4:
        return sm4_mac(session_key, data)
    raise CryptoError(f"unknown algorithm {algorithm!r}")


# --------------------------------------------------------------------------------------------------
# Transaction MACs and TACs (§5.7)


def purchase_mac1(
    sespk: bytes,
    amount: int,
    transaction_type: int,
    terminal6: bytes,
    datetime7: bytes,
    algorithm: Algorithm = Algorithm.TDES,
) -> bytes:
    """Purchase MAC1 over amount(4) || type(1) || terminal(6) || date(4) || time(3) (§5.7)."""
    data = (
        _amount("amount", amount)
        + _txn_type(transaction_type)
        + _octets("terminal number", terminal6, 6)
        + _octets("date/time", datetime7, 7)
    )
    return session_mac(sespk, data, algorithm)


def purchase_mac2(sespk: bytes, amount: int, algorithm: Algorithm = Algorithm.TDES) -> bytes:
    """Purchase MAC2 over amount(4) (§5.7)."""
    return session_mac(sespk, _amount("amount", amount), algorithm)


def purchase_tac(
    dtk: bytes,
    amount: int,
    transaction_type: int,
    terminal6: bytes,
    ttc: int,
    datetime7: bytes,
    algorithm: Algorithm = Algorithm.TDES,
) -> bytes:
    """Purchase TAC over amount(4) || type(1) || terminal(6) || TTC(4) || date(4) || time(3) (§5.7).

    TDES: ``MAC_DES(DTK_L XOR DTK_R, data)``. SM4 (UNCONFIRMED, §10 item 1): SM4 MAC under the
    16-byte DTK itself.
    """
    data = (
        _amount("amount", amount)
        + _txn_type(transaction_type)
        + _octets("terminal number", terminal6, 6)
        + _uint("terminal transaction sequence", ttc, 4)
        + _octets("date/time", datetime7, 7)
    )
    if algorithm == Algorithm.TDES:
        return pboc_des_mac(tac_key(dtk), data)
    if algorithm == Algorithm.SM4:
        return sm4_mac(dtk, data)
    raise CryptoError(f"unknown algorithm {algorithm!r}")


def load_mac1(
    seslk: bytes,
    old_balance: int,
    amount: int,
    transaction_type: int,
    terminal6: bytes,
    algorithm: Algorithm = Algorithm.TDES,
) -> bytes:
    """Load MAC1 over old balance(4) || amount(4) || type(1) || terminal(6) (§5.7)."""
    data = (
        _amount("old balance", old_balance)
        + _amount("amount", amount)
        + _txn_type(transaction_type)
        + _octets("terminal number", terminal6, 6)
    )
    return session_mac(seslk, data, algorithm)


def load_mac2(
    seslk: bytes,
    amount: int,
    transaction_type: int,
    terminal6: bytes,
    datetime7: bytes,
    algorithm: Algorithm = Algorithm.TDES,
) -> bytes:
    """Load MAC2 over amount(4) || type(1) || terminal(6) || date(4) || time(3) (§5.7)."""
    data = (
        _amount("amount", amount)
        + _txn_type(transaction_type)
        + _octets("terminal number", terminal6, 6)
        + _octets("date/time", datetime7, 7)
    )
    return session_mac(seslk, data, algorithm)


def load_tac(
    dtk: bytes,
    new_balance: int,
    online_counter_before: int,
    amount: int,
    transaction_type: int,
    terminal6: bytes,
    datetime7: bytes,
    *,
    pad_aligned: bool = True,
    algorithm: Algorithm = Algorithm.TDES,
) -> bytes:
    """Load TAC (§5.7, L-confidence layout), ``MAC_DES(DTK_L XOR DTK_R, data)`` over
    new balance(4) || online counter before the increment(2) || amount(4) || type(1) ||
    terminal(6) || date(4) || time(3).

    The 24-byte input is block-aligned, so ``pad_aligned`` (§5.2 open point) matters here only.
    SM4 (UNCONFIRMED, as for the purchase TAC): SM4 MAC under the 16-byte DTK itself.
    """
    data = (
        _amount("new balance", new_balance)
        + _uint("online counter", online_counter_before, 2)
        + _amount("amount", amount)
        + _txn_type(transaction_type)
        + _octets("terminal number", terminal6, 6)
        + _octets("date/time", datetime7, 7)
    )
    if algorithm == Algorithm.SM4:
        return sm4_mac(dtk, data, pad_aligned=pad_aligned)
    return pboc_des_mac(tac_key(dtk), data, pad_aligned=pad_aligned)


def application_block_mac(damk16: bytes, challenge4: bytes) -> bytes:
    """APPLICATION BLOCK MAC (§5.7): retail MAC of ``841E000004``, IV = challenge4 || 00000000."""
    iv = _octets("card challenge", challenge4, 4) + bytes(4)
    return retail_mac(damk16, _APPLICATION_BLOCK_HEADER, iv)


# --------------------------------------------------------------------------------------------------
# BCD (§1)

_DIGITS = "0123456789"


def bcd_encode(digits: str) -> bytes:
    """Packed BCD of an even-length decimal string, e.g. ``"20240101"`` -> ``20 24 01 01``."""
    if not isinstance(digits, str):
        raise CryptoError(f"BCD digits must be a str, got {type(digits).__name__}")
    if len(digits) % 2:
        raise CryptoError(f"BCD needs an even number of digits, got {len(digits)}: {digits!r}")
    if any(c not in _DIGITS for c in digits):
        raise CryptoError(f"BCD digits must be 0-9, got {digits!r}")
    return bytes.fromhex(digits)


def bcd_decode(data: bytes) -> str:
    """Decimal string of packed BCD; :class:`CryptoError` on a nibble above 9."""
    raw = _any_octets("BCD data", data)
    text = raw.hex()
    if any(c not in _DIGITS for c in text):
        raise CryptoError(f"not BCD: {text.upper()}")
    return text


def datetime7(when: datetime.datetime) -> bytes:
    """7-byte BCD ``YYYYMMDDhhmmss`` (§1) of the wall-clock fields of ``when`` (tzinfo ignored)."""
    return bcd_encode(
        f"{when.year:04d}{when.month:02d}{when.day:02d}"
        f"{when.hour:02d}{when.minute:02d}{when.second:02d}"
    )
