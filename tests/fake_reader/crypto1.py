"""Crypto1 in pure Python, written clean-room from the published description in
m1-purse-and-readers.md §2.1-§2.3 (not derived from crapto1's GPL source).

A 48-bit LFSR kept as two interleaved 24-bit halves (``odd`` feeds the filter); each clock
outputs the filter bit, feeds back ``parity(odd & 0x29CE5C ^ even & 0x870804) ^ in
[^ ks if encrypted]`` and swaps the halves. Bytes go LSB first; words are big-endian (the first
byte on air is the most significant), each byte LSB first. Also: the card PRNG successor, the
odd parity and encrypted-parity rules, 4-bit ACK/NAK encryption, and CRC_A (ISO/IEC 14443-3).
"""

from __future__ import annotations

MASK24 = 0xFFFFFF
MASK32 = 0xFFFFFFFF
LF_POLY_ODD = 0x29CE5C
LF_POLY_EVEN = 0x870804

ACK = 0xA


def _bit(x: int, n: int) -> int:
    return (x >> n) & 1


def parity(x: int) -> int:
    """Parity of the set bits (1 = odd number of ones)."""
    return bin(x).count("1") & 1


def odd_parity(byte: int) -> int:
    """The ISO 14443 parity bit of a byte: makes the number of ones odd."""
    return parity(byte) ^ 1


def filter_bit(x: int) -> int:
    """The non-linear filter on bits 0..19 (§2.1): five 4-input lookups, one 5-input."""
    f = (
        ((0xF22C0 >> (x & 0xF)) & 16)
        | ((0x6C9C0 >> ((x >> 4) & 0xF)) & 8)
        | ((0x3C8B0 >> ((x >> 8) & 0xF)) & 4)
        | ((0x1E458 >> ((x >> 12) & 0xF)) & 2)
        | ((0x0D938 >> ((x >> 16) & 0xF)) & 1)
    )
    return (0xEC57E80A >> f) & 1


class Crypto1:
    """The cipher state after loading a 6-byte key."""

    __slots__ = ("even", "odd")

    def __init__(self, key: bytes) -> None:
        if len(key) != 6:
            raise ValueError("a Crypto1 key is 6 bytes")
        k = int.from_bytes(key, "big")
        odd = even = 0
        for i in range(47, 0, -2):
            odd = (odd << 1) | _bit(k, (i - 1) ^ 7)
            even = (even << 1) | _bit(k, i ^ 7)
        self.odd, self.even = odd, even

    def peek(self) -> int:
        """The filter output without clocking (the next keystream bit)."""
        return filter_bit(self.odd)

    def bit(self, bit_in: int = 0, encrypted: bool = False) -> int:
        ks = filter_bit(self.odd)
        fb = (ks if encrypted else 0) ^ (bit_in & 1)
        fb ^= parity((LF_POLY_ODD & self.odd) ^ (LF_POLY_EVEN & self.even))
        self.even = ((self.even << 1) | fb) & MASK24
        self.odd, self.even = self.even, self.odd
        return ks

    def byte(self, byte_in: int = 0, encrypted: bool = False) -> int:
        out = 0
        for i in range(8):
            out |= self.bit(_bit(byte_in, i), encrypted) << i
        return out

    def word(self, word_in: int = 0, encrypted: bool = False) -> int:
        """32 clocks; ``word_in`` big-endian on air, each byte LSB first."""
        out = 0
        for i in range(32):
            out |= self.bit(_bit(word_in, i ^ 24), encrypted) << (i ^ 24)
        return out

    # --- frames ------------------------------------------------------------------------------

    def encrypt(self, plain: bytes) -> list[tuple[int, int]]:
        """(cipher byte, parity bit sent) per byte: parity = oddparity(p) ^ peek (§2.2)."""
        out = []
        for p in plain:
            c = self.byte() ^ p
            out.append((c, odd_parity(p) ^ self.peek()))
        return out

    def decrypt(self, frame: list[tuple[int, int]]) -> tuple[bytes, bool]:
        """Plain bytes, and whether every parity bit matched the rule."""
        plain = bytearray()
        ok = True
        for c, par in frame:
            p = self.byte() ^ c
            ok &= par == odd_parity(p) ^ self.peek()
            plain.append(p)
        return bytes(plain), ok

    def nibble(self, value: int) -> int:
        """Encrypt or decrypt a 4-bit ACK/NAK (4 clocks, input 0)."""
        out = 0
        for i in range(4):
            out |= (_bit(value, i) ^ self.bit()) << i
        return out


def prng_successor(x: int, n: int) -> int:
    """The card PRNG stepped ``n`` times (§2.1): byte-swapped 16-bit LFSR in a 32-bit window."""
    x = int.from_bytes((x & MASK32).to_bytes(4, "big")[::-1], "big")
    for _ in range(n):
        x = (x >> 1) | ((((x >> 16) ^ (x >> 18) ^ (x >> 19) ^ (x >> 21)) & 1) << 31)
    return int.from_bytes(x.to_bytes(4, "big")[::-1], "big")


def crc_a(data: bytes) -> bytes:
    """CRC_A of ISO/IEC 14443-3: init 0x6363, reflected polynomial 0x8408, LSB first."""
    crc = 0x6363
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return bytes((crc & 0xFF, crc >> 8))


def frame_with_parity(data: bytes) -> list[tuple[int, int]]:
    """A plain (unencrypted) frame: each byte with its odd parity."""
    return [(b, odd_parity(b)) for b in data]
