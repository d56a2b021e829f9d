"""Tests of agent.crypto against cpu-purse.md §5.8 and standard known answers.

Vector provenance is in each test name and docstring:

* "published": the A1/A2 posts (P1, P3) and the P2 TAC key, confirmed independently in §5.8;
* "self-computed": B1-E of §5.8, computed from the spec's own formulas (regression pins, NOT
  independent evidence that the formulas match real cards);
* "standard": FIPS/GB/T known answers for the primitives.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from agent.crypto import (
    SM4_SESSION_KEY_VARIANTS,
    Algorithm,
    CryptoError,
    application_block_mac,
    bcd_decode,
    bcd_encode,
    datetime7,
    des_decrypt,
    des_encrypt,
    diversify,
    diversify_3des,
    diversify_sm4,
    load_mac1,
    load_mac2,
    load_session_key,
    load_tac,
    pad80,
    pboc_des_mac,
    purchase_mac1,
    purchase_mac2,
    purchase_session_key_3des,
    purchase_session_key_sm4_pad80,
    purchase_tac,
    retail_mac,
    session_mac,
    sm4_encrypt,
    sm4_mac,
    tac_key,
    tdes_decrypt,
    tdes_encrypt,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# §5.8 (A): key used in the posts for both DLK and DPK.
POST_KEY = h("11223344556677888877665544332211")
POST_TERMINAL = h("001122334455")

# §5.8 (C1-E) self-computed inputs.
MPK = h("404142434445464748494A4B4C4D4E4F")
MTK = h("505152535455565758595A5B5C5D5E5F")
MAMK = h("606162636465666768696A6B6C6D6E6F")
ISSUER = h("01011000FFFFFFFF")  # level-1 factor, EF15[0..7]
ASN = h("5170070104791381")  # card factor, EF15[12..19]
C_TERMINAL = h("000000000024")
C_DATETIME = h("20240101 120000")


# --------------------------------------------------------------------------------------------------
# Standard known answers for the primitives


def test_des_standard_known_answers() -> None:
    """Standard DES known answers (FIPS 46 worked example; FIPS 81 ECB example)."""
    assert des_encrypt(h("133457799BBCDFF1"), h("0123456789ABCDEF")) == h("85E813540F0AB405")
    assert des_decrypt(h("133457799BBCDFF1"), h("85E813540F0AB405")) == h("0123456789ABCDEF")
    assert des_encrypt(h("0123456789ABCDEF"), b"Now is t") == h("3FA40E8A984D4815")


def test_des_cbc_mac_fips113_standard() -> None:
    """Standard FIPS 113 / ANSI X9.9 DAA example: CBC-DES MAC chaining with zero IV.

    FIPS 113 zero-fills the last block; pad_aligned=False lets us feed the zero-filled data.
    """
    data = b"7654321 Now is the time for " + bytes(4)
    assert pboc_des_mac(h("0123456789ABCDEF"), data, pad_aligned=False) == h("F1D30F68")


def test_sm4_gbt32907_standard_example() -> None:
    """Standard GB/T 32907 example 1, one encryption (the 10^6-iteration variant is skipped)."""
    key = h("0123456789abcdeffedcba9876543210")
    assert sm4_encrypt(key, key) == h("681edf34d206965e86b3e94f536e4246")


def test_tdes_with_equal_halves_is_single_des() -> None:
    key8 = h("133457799BBCDFF1")
    block = h("0123456789ABCDEF")
    assert tdes_encrypt(key8 + key8, block) == des_encrypt(key8, block)
    assert tdes_decrypt(key8 + key8, h("85E813540F0AB405")) == block


def test_tdes_is_ede_of_single_des() -> None:
    kl, kr = POST_KEY[:8], POST_KEY[8:]
    block = h("1122334400000001")
    assert tdes_encrypt(POST_KEY, block) == des_encrypt(kl, des_decrypt(kr, des_encrypt(kl, block)))


# --------------------------------------------------------------------------------------------------
# Published vectors (§5.8 A)


def test_a1_published_load_session_key_and_macs() -> None:
    """Published A1 (P3): SESLK, load MAC1, load MAC2."""
    seslk = load_session_key(POST_KEY, h("11223344"), 0)
    assert seslk == h("9B1D924E05595603")
    assert load_mac1(seslk, 0, 0x1000, 0x01, POST_TERMINAL) == h("2988AE5A")
    assert load_mac2(seslk, 0x1000, 0x01, POST_TERMINAL, h("20111221 214822")) == h("3A845BF0")


def test_a2_published_purchase_session_key_and_macs() -> None:
    """Published A2 (P1): SESPK, purchase MAC1, purchase MAC2."""
    sespk = purchase_session_key_3des(POST_KEY, h("11223344"), 0, 1)
    assert sespk == h("003238ABC57659DD")
    assert purchase_mac1(sespk, 0x1000, 0x06, POST_TERMINAL, h("20120229 135100")) == h("F15CAB75")
    assert purchase_mac2(sespk, 0x1000) == h("56988A13")
    assert purchase_mac2(sespk, 0x1000, Algorithm.TDES) == h("56988A13")


def test_a2_published_session_key_uses_last_two_ttc_bytes() -> None:
    """Published A2: only TTC[2..3] enters SESPK (§5.6)."""
    assert purchase_session_key_3des(POST_KEY, h("11223344"), 0, 0xABCD_0001) == h(
        "003238ABC57659DD"
    )


def test_p2_published_tac_key() -> None:
    """Published P2 TAC key: DTK halves XORed."""
    assert tac_key(h("00112233445566778899AABBCCDDEEFF")) == h("8888888888888888")


# --------------------------------------------------------------------------------------------------
# Self-computed vectors (§5.8 B-E): regression pins of the spec's formulas


def test_b1_self_computed_purchase_tac() -> None:
    """Self-computed B1: purchase TAC under TAC key 8888888888888888."""
    data = h("00001000 06 001122334455 00000001 20120229 135100")
    assert pboc_des_mac(h("8888888888888888"), data) == h("B3A0D49C")
    dtk = h("00112233445566778899AABBCCDDEEFF")  # P2 DTK -> TAC key 8888888888888888
    tac = purchase_tac(dtk, 0x1000, 0x06, POST_TERMINAL, 1, h("20120229 135100"))
    assert tac == h("B3A0D49C")


def test_b2_self_computed_load_tac() -> None:
    """Self-computed B2: load TAC (L-confidence layout, 24 bytes, padding always appended)."""
    data = h("00001000 0000 00001000 01 001122334455 20111221 214822")
    assert pboc_des_mac(h("8888888888888888"), data) == h("6314E5F5")
    dtk = h("00112233445566778899AABBCCDDEEFF")
    tac = load_tac(dtk, 0x1000, 0, 0x1000, 0x01, POST_TERMINAL, h("20111221 214822"))
    assert tac == h("6314E5F5")
    unpadded = load_tac(
        dtk, 0x1000, 0, 0x1000, 0x01, POST_TERMINAL, h("20111221 214822"), pad_aligned=False
    )
    assert unpadded == pboc_des_mac(h("8888888888888888"), data, pad_aligned=False)
    assert unpadded != tac


def test_c1_self_computed_two_level_diversification() -> None:
    """Self-computed C1: T-Union DPK = Div(Div(MPK, issuer), ASN)."""
    level1 = diversify_3des(MPK, ISSUER)
    assert level1 == h("D1DDE3110396EDEEDF3FAF569AF955D1")
    assert diversify_3des(level1, ASN) == h("FE1FCDF7D251C0D11880F9B6FEF07E75")
    # Factors as listed in the 80 70 APDU: card level first.
    assert diversify(MPK, [ASN, ISSUER], Algorithm.TDES) == h("FE1FCDF7D251C0D11880F9B6FEF07E75")
    assert diversify(MPK, [ISSUER, ASN], Algorithm.TDES, apdu_order_card_first=False) == h(
        "FE1FCDF7D251C0D11880F9B6FEF07E75"
    )


def test_c1_self_computed_factors_sliced_from_8070_apdu() -> None:
    """Self-computed C1 transcript: the factors of the PSAM 80 70 data, in APDU order."""
    apdu = h(
        "8070000024 A1B2C3D4 0005 00000064 09 20240101 120000 01 00"
        " 5170070104791381 01011000FFFFFFFF 08"
    )
    data = apdu[5 : 5 + apdu[4]]
    factors = [data[20 + 8 * i : 28 + 8 * i] for i in range((len(data) - 20) // 8)]
    assert factors == [ASN, ISSUER]
    assert diversify(MPK, factors, Algorithm.TDES) == h("FE1FCDF7D251C0D11880F9B6FEF07E75")


def test_c2_self_computed_sespk() -> None:
    """Self-computed C2: SESPK from the C1 DPK."""
    dpk = h("FE1FCDF7D251C0D11880F9B6FEF07E75")
    assert purchase_session_key_3des(dpk, h("A1B2C3D4"), 0x0005, 0x00000010) == h(
        "3BD8DD691364B94E"
    )


def test_c3_self_computed_purchase_macs() -> None:
    """Self-computed C3: compound purchase (type 09) MAC1 and MAC2."""
    sespk = h("3BD8DD691364B94E")
    assert purchase_mac1(sespk, 100, 0x09, C_TERMINAL, C_DATETIME) == h("B7ADB8CD")
    assert purchase_mac2(sespk, 100) == h("D06E03F3")


def test_c4_self_computed_dtk_and_tac() -> None:
    """Self-computed C4: DTK diversified as in C1, purchase TAC with the C2/C3 values."""
    dtk = diversify(MTK, [ASN, ISSUER], Algorithm.TDES)
    assert dtk == h("7555E3F06DCDBAAE3862725759E7D9EF")
    assert purchase_tac(dtk, 100, 0x09, C_TERMINAL, 0x10, C_DATETIME) == h("8D8715C6")


def test_d_self_computed_application_block_mac() -> None:
    """Self-computed D: DAMK diversified as in C1, retail MAC of 841E000004."""
    damk = diversify(MAMK, [ASN, ISSUER], Algorithm.TDES)
    assert damk == h("8DEBFF4AA78B18396CF724CD379D18DB")
    assert application_block_mac(damk, h("11223344")) == h("D2AD05F0")
    assert retail_mac(damk, h("841E000004"), h("11223344 00000000")) == h("D2AD05F0")


def test_e_self_computed_sm4_diversification_and_mac() -> None:
    """Self-computed E: SM4 diversification and SM4-CBC-MAC (MAC format itself unconfirmed)."""
    dk = diversify_sm4(h("0123456789ABCDEFFEDCBA9876543210"), ASN)
    assert dk == h("33733DDD3C129BBB14F615957328E008")
    assert diversify(h("0123456789ABCDEFFEDCBA9876543210"), [ASN], Algorithm.SM4) == dk
    assert sm4_mac(dk, h("00000064")) == h("A50E6950")
    assert session_mac(dk, h("00000064"), Algorithm.SM4) == h("A50E6950")
    assert purchase_mac2(dk, 100, Algorithm.SM4) == h("A50E6950")


# --------------------------------------------------------------------------------------------------
# Structure of the formulas (§5.3-§5.6)


def test_retail_mac_is_des_cbc_then_3des_on_last_block() -> None:
    """ISO 9797-1 alg. 3 == single-DES CBC over D1..Dn-1, then 3DES of y(n-1) XOR Dn."""
    key = h("0123456789ABCDEFFEDCBA9876543210")
    iv = h("11223344 00000000")
    data = bytes(range(20))
    padded = pad80(data)
    y = iv
    for i in range(0, len(padded) - 8, 8):
        y = des_encrypt(key[:8], bytes(a ^ b for a, b in zip(y, padded[i : i + 8], strict=True)))
    last = bytes(a ^ b for a, b in zip(y, padded[-8:], strict=True))
    assert retail_mac(key, data, iv) == tdes_encrypt(key, last)[:4]


def test_retail_mac_with_equal_halves_is_des_mac() -> None:
    key8 = h("0123456789ABCDEF")
    data = h("841E000004")
    iv = h("11223344 00000000")
    assert retail_mac(key8 + key8, data, iv) == pboc_des_mac(key8, data, iv)


def test_diversify_3des_second_half_uses_complement() -> None:
    factor = h("0011223344556677")
    key = diversify_3des(MPK, factor)
    assert key[:8] == tdes_encrypt(MPK, factor)
    assert key[8:] == tdes_encrypt(MPK, h("FFEEDDCCBBAA9988"))


def test_diversify_sm4_is_one_block_of_factor_and_complement() -> None:
    factor = h("0011223344556677")
    assert diversify_sm4(MPK, factor) == sm4_encrypt(MPK, factor + h("FFEEDDCCBBAA9988"))


def test_diversify_without_factors_returns_master() -> None:
    assert diversify(MPK, [], Algorithm.TDES) == MPK


def test_load_session_key_layout() -> None:
    assert load_session_key(POST_KEY, h("11223344"), 0x0102) == tdes_encrypt(
        POST_KEY, h("11223344 0102 8000")
    )


def test_sm4_session_key_pad80_variant() -> None:
    """UNCONFIRMED SM4 variant: SM4_DPK(rnd4 || ctr2 || ttc2 || 80 00..00), 16 bytes."""
    dpk = h("33733DDD3C129BBB14F615957328E008")
    key = purchase_session_key_sm4_pad80(dpk, h("A1B2C3D4"), 5, 0x1234_0010)
    assert len(key) == 16
    assert key == sm4_encrypt(dpk, h("A1B2C3D4 0005 0010 80 00000000000000"))
    assert SM4_SESSION_KEY_VARIANTS["pad80"] is purchase_session_key_sm4_pad80


def test_sm4_purchase_macs_and_tac_use_sm4_mac() -> None:
    key = h("33733DDD3C129BBB14F615957328E008")
    mac1 = purchase_mac1(key, 100, 0x09, C_TERMINAL, C_DATETIME, Algorithm.SM4)
    assert mac1 == sm4_mac(key, h("00000064 09") + C_TERMINAL + C_DATETIME)
    tac = purchase_tac(key, 100, 0x09, C_TERMINAL, 0x10, C_DATETIME, Algorithm.SM4)
    assert tac == sm4_mac(key, h("00000064 09") + C_TERMINAL + h("00000010") + C_DATETIME)


def test_session_mac_tdes_is_des_mac() -> None:
    assert session_mac(h("3BD8DD691364B94E"), h("00000064"), Algorithm.TDES) == h("D06E03F3")


def test_sm4_mac_iv_and_padding() -> None:
    key = h("0123456789ABCDEFFEDCBA9876543210")
    data = bytes(range(16))
    assert sm4_mac(key, data, pad_aligned=False) == sm4_encrypt(key, data)[:4]
    iv = bytes(range(100, 116))
    assert (
        sm4_mac(key, b"", iv)
        == sm4_encrypt(key, bytes(a ^ b for a, b in zip(iv, pad80(b"", 16), strict=True)))[:4]
    )


def test_algorithm_ids() -> None:
    assert Algorithm.TDES.value == 0x00
    assert Algorithm.SM4.value == 0x04
    assert Algorithm(4) is Algorithm.SM4


# --------------------------------------------------------------------------------------------------
# Padding (§5.2)


@pytest.mark.parametrize(
    ("data", "block", "expected"),
    [
        ("", 8, "8000000000000000"),
        ("01", 8, "0180000000000000"),
        ("01020304050607", 8, "0102030405060780"),
        ("0102030405060708", 8, "0102030405060708 8000000000000000"),
        ("00000064", 16, "00000064 800000000000000000000000"),
        ("841E000004", 8, "841E000004800000"),
    ],
)
def test_pad80_always_appends(data: str, block: int, expected: str) -> None:
    assert pad80(h(data), block) == h(expected)
    assert pad80(h(data), block, pad_aligned=True) == h(expected)


def test_pad80_aligned_input_left_alone_when_not_padding_aligned() -> None:
    aligned = h("0102030405060708")
    assert pad80(aligned, pad_aligned=False) == aligned
    assert pad80(aligned * 2, 16, pad_aligned=False) == aligned * 2
    # Non-aligned input is padded in both modes.
    assert pad80(h("01"), pad_aligned=False) == h("0180000000000000")


def test_pboc_des_mac_pad_aligned_modes_differ_only_for_aligned_input() -> None:
    key = h("8888888888888888")
    aligned = bytes(range(16))
    assert pboc_des_mac(key, aligned) != pboc_des_mac(key, aligned, pad_aligned=False)
    ragged = bytes(range(15))
    assert pboc_des_mac(key, ragged) == pboc_des_mac(key, ragged, pad_aligned=False)


# --------------------------------------------------------------------------------------------------
# BCD and date/time (§1)


def test_datetime7() -> None:
    when = datetime.datetime(2024, 1, 1, 12, 0, 0)
    assert datetime7(when) == h("20240101 120000")
    assert datetime7(datetime.datetime(2011, 12, 21, 21, 48, 22)) == h("20111221214822")
    assert datetime7(datetime.datetime(999, 1, 2, 3, 4, 5)) == h("09990102030405")


def test_bcd() -> None:
    assert bcd_encode("20240101") == h("20240101")
    assert bcd_decode(h("20240101")) == "20240101"
    assert bcd_encode("") == b""


@pytest.mark.parametrize("bad", ["123", "12a4", "1 23", "١٢"])
def test_bcd_encode_rejects_bad_digits(bad: str) -> None:
    with pytest.raises(CryptoError):
        bcd_encode(bad)


@pytest.mark.parametrize("bad", ["1A", "A1", "FF", "20241F"])
def test_bcd_decode_rejects_non_decimal_nibble(bad: str) -> None:
    with pytest.raises(CryptoError, match="not BCD"):
        bcd_decode(h(bad))


# --------------------------------------------------------------------------------------------------
# Input errors


K8 = bytes(8)
K16 = bytes(16)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: des_encrypt(bytes(7), K8), "DES key must be 8 bytes"),
        (lambda: des_encrypt(K16, K8), "DES key must be 8 bytes"),
        (lambda: des_decrypt(K8, bytes(9)), "DES block must be 8 bytes"),
        (lambda: tdes_encrypt(K8, K8), "3DES key must be 16 bytes"),
        (lambda: tdes_encrypt(bytes(24), K8), "3DES key must be 16 bytes"),
        (lambda: tdes_decrypt(K16, K16), "3DES block must be 8 bytes"),
        (lambda: sm4_encrypt(K8, K16), "SM4 key must be 16 bytes"),
        (lambda: sm4_encrypt(K16, K8), "SM4 block must be 16 bytes"),
        (lambda: pboc_des_mac(K16, b"x"), "DES MAC key must be 8 bytes"),
        (lambda: pboc_des_mac(K8, b"x", bytes(4)), "IV must be 8 bytes"),
        (lambda: pboc_des_mac(K8, b"", pad_aligned=False), "empty"),
        (lambda: retail_mac(K8, b"x"), "retail MAC key must be 16 bytes"),
        (lambda: retail_mac(K16, b"x", K16), "IV must be 8 bytes"),
        (lambda: sm4_mac(K16, b"x", K8), "IV must be 16 bytes"),
        (lambda: sm4_mac(K8, b"x"), "SM4 MAC key must be 16 bytes"),
        (lambda: diversify_3des(K8, K8), "master key must be 16 bytes"),
        (lambda: diversify_3des(K16, K16), "factor must be 8 bytes"),
        (lambda: diversify_sm4(K16, bytes(4)), "factor must be 8 bytes"),
        (lambda: diversify(K8, [K8], Algorithm.TDES), "master key must be 16 bytes"),
        (lambda: diversify(K16, [K8, bytes(7)], Algorithm.SM4), "factor must be 8 bytes"),
        (lambda: tac_key(K8), "DTK must be 16 bytes"),
        (lambda: purchase_session_key_3des(K8, bytes(4), 0, 0), "DPK must be 16 bytes"),
        (lambda: purchase_session_key_3des(K16, bytes(8), 0, 0), "card random must be 4"),
        (lambda: purchase_session_key_3des(K16, bytes(4), 0x10000, 0), "offline counter"),
        (lambda: purchase_session_key_3des(K16, bytes(4), 0, 1 << 32), "sequence"),
        (lambda: purchase_session_key_sm4_pad80(K16, bytes(4), -1, 0), "offline counter"),
        (lambda: load_session_key(K16, bytes(4), 0x10000), "online counter"),
        (lambda: session_mac(K16, b"x", Algorithm.TDES), "DES MAC key must be 8 bytes"),
        (lambda: session_mac(K8, b"x", Algorithm.SM4), "SM4 MAC key must be 16 bytes"),
        (lambda: purchase_mac2(K8, 1 << 32), "amount"),
        (lambda: purchase_mac2(K8, -1), "amount"),
        (lambda: purchase_mac1(K8, 1, 0x100, bytes(6), bytes(7)), "transaction type"),
        (lambda: purchase_mac1(K8, 1, 6, bytes(5), bytes(7)), "terminal number must be 6"),
        (lambda: purchase_mac1(K8, 1, 6, bytes(6), bytes(8)), "date/time must be 7"),
        (lambda: purchase_tac(K8, 1, 6, bytes(6), 0, bytes(7)), "DTK must be 16 bytes"),
        (lambda: purchase_tac(K16, 1, 6, bytes(6), -1, bytes(7)), "sequence"),
        (lambda: load_mac1(K8, 1 << 32, 0, 2, bytes(6)), "old balance"),
        (lambda: load_mac2(K8, 0, 2, bytes(6), bytes(6)), "date/time must be 7"),
        (lambda: load_tac(K16, 0, 0x10000, 0, 2, bytes(6), bytes(7)), "online counter"),
        (lambda: application_block_mac(K16, bytes(8)), "card challenge must be 4"),
        (lambda: application_block_mac(K8, bytes(4)), "retail MAC key must be 16 bytes"),
        (lambda: pad80(b"x", 0), "block size"),
    ],
)
def test_bad_inputs_raise_crypto_error(call: Any, message: str) -> None:
    with pytest.raises(CryptoError, match=message):
        call()


def test_crypto_error_is_value_error_and_rejects_wrong_types() -> None:
    assert issubclass(CryptoError, ValueError)
    not_bytes: Any = "0123456789ABCDEF"
    with pytest.raises(CryptoError, match="must be bytes"):
        tdes_encrypt(not_bytes, K8)
    not_int: Any = True
    with pytest.raises(CryptoError, match="must be an int"):
        purchase_mac2(K8, not_int)
    unknown: Any = 7
    with pytest.raises(CryptoError, match="unknown algorithm"):
        diversify(K16, [K8], unknown)
    with pytest.raises(CryptoError, match="unknown algorithm"):
        session_mac(K8, b"x", unknown)


def test_bytes_like_inputs_accepted() -> None:
    key = bytearray(h("133457799BBCDFF1"))
    assert des_encrypt(bytes(key), memoryview(h("0123456789ABCDEF")).tobytes()) == h(
        "85E813540F0AB405"
    )
    loose: Any = bytearray(h("0123456789ABCDEF"))
    assert des_encrypt(h("133457799BBCDFF1"), loose) == h("85E813540F0AB405")


# --------------------------------------------------------------------------------------------------
# Properties

blocks8 = st.binary(min_size=8, max_size=8)
keys16 = st.binary(min_size=16, max_size=16)


@given(key=blocks8, block=blocks8)
def test_des_round_trip(key: bytes, block: bytes) -> None:
    assert des_decrypt(key, des_encrypt(key, block)) == block


@given(key=keys16, block=blocks8)
def test_tdes_round_trip(key: bytes, block: bytes) -> None:
    assert tdes_decrypt(key, tdes_encrypt(key, block)) == block


@given(master=keys16, first=blocks8, second=blocks8, algorithm=st.sampled_from(list(Algorithm)))
def test_diversify_factor_order_matters(
    master: bytes, first: bytes, second: bytes, algorithm: Algorithm
) -> None:
    assume(first != second)
    listed = diversify(master, [first, second], algorithm, apdu_order_card_first=False)
    reversed_ = diversify(master, [first, second], algorithm)
    assert listed != reversed_
    assert reversed_ == diversify(master, [second, first], algorithm, apdu_order_card_first=False)


@given(digits=st.text(alphabet="0123456789", max_size=40).filter(lambda s: len(s) % 2 == 0))
def test_bcd_round_trip(digits: str) -> None:
    assert bcd_decode(bcd_encode(digits)) == digits


@given(data=st.binary(max_size=64), block=st.sampled_from([8, 16]), pad_aligned=st.booleans())
def test_pad80_properties(data: bytes, block: int, pad_aligned: bool) -> None:
    padded = pad80(data, block, pad_aligned=pad_aligned)
    assert len(padded) % block == 0
    assert padded.startswith(data)
    if not pad_aligned and len(data) % block == 0:
        assert padded == data
    else:
        assert 0 < len(padded) - len(data) <= block
        assert padded[len(data)] == 0x80
        assert not any(padded[len(data) + 1 :])


@given(
    when=st.datetimes(
        min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2099, 12, 31)
    )
)
def test_datetime7_round_trip(when: datetime.datetime) -> None:
    text = bcd_decode(datetime7(when))
    assert datetime.datetime.strptime(text, "%Y%m%d%H%M%S") == when.replace(microsecond=0)
