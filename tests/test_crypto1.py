"""Crypto1 against the vectors of m1-purse-and-readers.md §2.5 (1-4 published, 5 the
simulator's regression vector cross-checked with mfkey64, 6 CRC_A from published traces)."""

from __future__ import annotations

import pytest

from tests.fake_reader.crypto1 import Crypto1, crc_a, odd_parity, prng_successor

FFKEY = bytes.fromhex("FFFFFFFFFFFF")


def _trace_auth(key: bytes, uid: int, nt: int, enc_nr: int) -> Crypto1:
    """The tag side of a first authentication, from the trace: plain nT, {nR} fed encrypted."""
    s = Crypto1(key)
    s.word(uid ^ nt)
    s.word(enc_nr, encrypted=True)
    return s


def _marked(text: str) -> list[tuple[int, bool]]:
    """'ab! b3!' -> [(0xab, True), (0xb3, True)] ('!' = parity differs from plain odd parity)."""
    return [(int(t.rstrip("!"), 16), t.endswith("!")) for t in text.split()]


def test_vector_1_published_trace_key_ffffffffffff():
    uid, nt, enc_nr, enc_ar, enc_at = 0x9C599B32, 0x82A4166C, 0xA1E458CE, 0x6EEA41E0, 0x5CADF439
    assert prng_successor(nt, 64) == 0x8D65734B
    assert prng_successor(nt, 96) == 0x9A427B20
    s = _trace_auth(FFKEY, uid, nt, enc_nr)
    ks2 = s.word()
    assert ks2 == 0xE38F32AB
    assert enc_ar ^ ks2 == prng_successor(nt, 64)
    ks3 = s.word()
    assert ks3 == 0xC6EF8F19
    assert enc_at ^ ks3 == prng_successor(nt, 96)


def test_vector_2_second_mfkey64_example():
    uid, nt, enc_nr, enc_ar, enc_at = 0x52B0F519, 0x5417D1F8, 0x4D545EA7, 0xE15AC8C2, 0x5056E41B
    s = _trace_auth(FFKEY, uid, nt, enc_nr)
    ks2, ks3 = s.word(), s.word()
    assert (ks2, ks3) == (0x3E8E1D77, 0xE4FD96DA)
    assert enc_ar ^ ks2 == prng_successor(nt, 64)
    assert enc_at ^ ks3 == prng_successor(nt, 96)


def test_vector_3_full_decryption_key_091e639cb715():
    key = bytes.fromhex("091E639CB715")
    uid, nt, enc_nr, plain_nr = 0x14579F69, 0xCE844261, 0xF8049CCB, 0x76BDC126
    # Reader side: nR is fed plain and sent encrypted, byte by byte.
    reader = Crypto1(key)
    reader.word(uid ^ nt)
    sent = bytes(reader.byte(b) ^ b for b in plain_nr.to_bytes(4, "big"))
    assert sent == enc_nr.to_bytes(4, "big")
    # Tag side: the encrypted feed cancels the keystream.
    s = _trace_auth(key, uid, nt, enc_nr)
    ks2, ks3 = s.word(), s.word()
    assert (ks2, ks3) == (0x73F18EC2, 0x41C20836)
    assert 0x0525C84F ^ ks2 == prng_successor(nt, 64)
    assert 0x9431CC40 ^ ks3 == prng_successor(nt, 96)
    # The same keystream continues over the next frame: READ 0x14 with its CRC.
    read = bytes(s.byte() ^ c for c in bytes.fromhex("7093df99"))
    assert read == bytes.fromhex("3014a7fe")
    assert crc_a(read[:2]) == read[2:]


def test_vector_4_nested_authentication_with_parity_marks():
    key = bytes.fromhex("059E2905BFCC")
    uid, nt = 0x5C467F63, 0x4BBF8A12
    tag_frame = _marked("ab! b3! 0b! D1")
    rdr_frame = _marked("46 03 39 66 AD c1! 81 62!")
    # Tag: {nT} = nT ^ ks with ks from word(uid ^ nT) fed plain; parity rule of §2.2.
    tag = Crypto1(key)
    feed = (uid ^ nt).to_bytes(4, "big")
    for i, plain in enumerate(nt.to_bytes(4, "big")):
        ks = tag.byte(feed[i])
        cipher, parity_sent = plain ^ ks, odd_parity(plain) ^ tag.peek()
        assert (cipher, parity_sent != odd_parity(cipher)) == tag_frame[i]
    # Reader: recovers nT from {nT} with an encrypted feed.
    reader = Crypto1(key)
    enc_nt = int.from_bytes(bytes(b for b, _ in tag_frame), "big")
    assert reader.word(uid ^ enc_nt, encrypted=True) ^ enc_nt == nt
    # Tag receives {nR}: every parity matches the rule, none differs from the marks.
    for cipher, marked in rdr_frame[:4]:
        plain = tag.byte(cipher, encrypted=True) ^ cipher
        parity_sent = odd_parity(plain) ^ tag.peek()
        assert (parity_sent != odd_parity(cipher)) == marked
    # {aR} = suc64(nT) encrypted with the continuing keystream, with the marked parities.
    ar = prng_successor(nt, 64).to_bytes(4, "big")
    for plain, (cipher, marked) in zip(ar, rdr_frame[4:], strict=True):
        assert tag.byte() ^ plain == cipher
        assert (odd_parity(plain) ^ tag.peek() != odd_parity(cipher)) == marked


def test_vector_5_simulator_regression_trace():
    """UID DEADBEEF, nT 4F5897DF, nR 12345678: every byte and every '!' of §2.5 vector 5."""
    uid, nt, nr = 0xDEADBEEF, 0x4F5897DF, 0x12345678
    assert crc_a(bytes.fromhex("6008")) == bytes.fromhex("bdf7")
    reader = Crypto1(FFKEY)
    reader.word(uid ^ nt)
    frame = []
    for b in nr.to_bytes(4, "big"):
        c = reader.byte(b) ^ b
        frame.append((c, odd_parity(b) ^ reader.peek()))
    frame += reader.encrypt(prng_successor(nt, 64).to_bytes(4, "big"))
    expected = _marked("36! f9 9b! 46 9c! 23! 5d 22!")
    assert [(c, p != odd_parity(c)) for c, p in frame] == expected
    at = reader.decrypt(_parity_frame("19 50 75! ec"))
    assert at[0] == prng_successor(nt, 96).to_bytes(4, "big") and at[1]
    read = reader.encrypt(bytes.fromhex("30084a24"))
    assert [(c, p != odd_parity(c)) for c, p in read] == _marked("3a! c7! 0b fa!")
    answer = "95 49 1d 50! 3e! 20! 07! 9d! ae fe! cc! a5! 87! f1! 87! 3b a8! 38"
    plain, parity_ok = reader.decrypt(_parity_frame(answer))
    assert parity_ok
    assert plain == bytes.fromhex("e803000017fcffffe803000008f708f75a28")
    assert crc_a(plain[:16]) == plain[16:]


def _parity_frame(text: str) -> list[tuple[int, int]]:
    """Air bytes with the parity actually sent (marked = the inverse of plain odd parity)."""
    return [(b, odd_parity(b) ^ int(m)) for b, m in _marked(text)]


@pytest.mark.parametrize(
    ("data", "crc"),
    [
        ("6032", "6469"),
        ("93709c599b326c", "6b30"),
        ("08", "b6dd"),
        ("3014", "a7fe"),
        ("5000", "57cd"),
    ],
)
def test_vector_6_crc_a(data, crc):
    assert crc_a(bytes.fromhex(data)) == bytes.fromhex(crc)


def test_nonce_satisfies_the_prng_relation():
    """A genuine nT is 32 PRNG outputs: w[16+k] = w[k] ^ w[k+2] ^ w[k+3] ^ w[k+5] (§2.1)."""
    for nonce in (0x82A4166C, 0xCE844261, 0x01200145, 0x4BBF8A12):
        w = int.from_bytes(nonce.to_bytes(4, "big")[::-1], "big")
        bits = [(w >> i) & 1 for i in range(32)]
        assert all(
            bits[16 + k] == bits[k] ^ bits[k + 2] ^ bits[k + 3] ^ bits[k + 5] for k in range(16)
        )


def test_nibble_round_trip():
    a, b = Crypto1(FFKEY), Crypto1(FFKEY)
    assert b.nibble(a.nibble(0xA)) == 0xA
