"""A strict BER-TLV parser for FCI and PPSE answers (ISO 7816-4 / EMV Book 1 annex B).

Untrusted input: every malformation raises :class:`TlvError` (a ``ValueError``); callers
translate it into the answering party's protocol error.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DEPTH = 8


class TlvError(ValueError):
    """The bytes are not well-formed BER-TLV."""


@dataclass(frozen=True, slots=True)
class Tlv:
    tag: int
    value: bytes
    children: tuple[Tlv, ...] = ()

    @property
    def constructed(self) -> bool:
        first = self.tag
        while first > 0xFF:
            first >>= 8
        return bool(first & 0x20)

    def find(self, tag: int) -> Tlv | None:
        """Depth-first search for the first node with ``tag`` (this node included)."""
        if self.tag == tag:
            return self
        for child in self.children:
            hit = child.find(tag)
            if hit is not None:
                return hit
        return None

    def find_all(self, tag: int) -> list[Tlv]:
        found = [self] if self.tag == tag else []
        for child in self.children:
            found.extend(child.find_all(tag))
        return found


def parse(data: bytes, depth: int = 0) -> list[Tlv]:
    """Parse a sequence of TLV objects; constructed ones are parsed recursively."""
    if depth > MAX_DEPTH:
        raise TlvError("TLV nested too deeply")
    out: list[Tlv] = []
    i = 0
    while i < len(data):
        if data[i] in (0x00, 0xFF):  # padding between objects (ISO 7816-4 §5.2.2)
            i += 1
            continue
        tag, i = _read_tag(data, i)
        length, i = _read_length(data, i)
        if i + length > len(data):
            raise TlvError(f"tag {tag:X}: length {length} runs past the end")
        value = bytes(data[i : i + length])
        i += length
        node = Tlv(tag, value)
        if node.constructed:
            node = Tlv(tag, value, tuple(parse(value, depth + 1)))
        out.append(node)
    return out


def find(data: bytes, tag: int) -> Tlv | None:
    for node in parse(data):
        hit = node.find(tag)
        if hit is not None:
            return hit
    return None


def _read_tag(data: bytes, i: int) -> tuple[int, int]:
    tag = data[i]
    i += 1
    if tag & 0x1F == 0x1F:
        for _ in range(3):
            if i >= len(data):
                raise TlvError("truncated multi-byte tag")
            tag = (tag << 8) | data[i]
            i += 1
            if not data[i - 1] & 0x80:
                break
        else:
            raise TlvError("tag longer than 4 bytes")
    return tag, i


def _read_length(data: bytes, i: int) -> tuple[int, int]:
    if i >= len(data):
        raise TlvError("missing length")
    first = data[i]
    i += 1
    if first < 0x80:
        return first, i
    count = first & 0x7F
    if count == 0 or count > 3:
        raise TlvError(f"unsupported length form {first:02X}")
    if i + count > len(data):
        raise TlvError("truncated length")
    return int.from_bytes(data[i : i + count], "big"), i + count
