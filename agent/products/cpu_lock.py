"""Blacklist lock of a CPU purse: APPLICATION BLOCK through the PSAM (cpu-purse.md §6.6).

::

    T→C  00 84 00 00 04                               C: rnd (4)
    T→S  80 1A 45 kid 10  ASN(8) ‖ F2(8)              (the card's diversification factors)
    T→S  80 FA 05 00 10  rnd(4) 00000000  84 1E 00 P2 04 80 00 00      S: MAC (first 4 used)
    T→C  84 1E 00 P2 04  MAC(4)                       C: 9000

Steps in the style of :mod:`agent.products.cpu_purse`: they yield card commands and receive
the card's answers; no I/O here. They run after the purse ADF was selected and read (the card
answers 6985 otherwise).
``P2`` 00 blocks temporarily (a later SELECT answers 6283), 01 permanently (9303) — the meaning
of P2 is L in the spec, so it is the caller's (profile's) choice. S2 sends the 84 1E without its
MAC (a bug); we always append it, as S3 does.

The MAC is the PSAM's (80 1A 45 kid, 80 FA 05 00 over :func:`block_mac_input`): the engine
(:mod:`agent.tap.cpu`) asks for it between the two steps, inside a journaled intent. The MAC
block is the card's cipher block: 8 bytes for 3DES, 16 for SM4 (§5.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.apdu import Command, Party, require
from agent.products.cpu_purse import Step

# 80 1A P1: high 3 bits = diversification levels (2), low 5 bits = key type 05 (application
# maintenance, S4 numbering), §4.4 — "45 xx 10" in S2/S3. Vendor numbering differs: configurable.
MAINTENANCE_KEY_USAGE = 0x45
P2_TEMPORARY = 0x00
P2_PERMANENT = 0x01


@dataclass(frozen=True, slots=True)
class LockOutcome:
    """What the lock did: the challenge used, the MAC sent, and P2 (00 temporary, 01 permanent)."""

    card_id: str
    challenge: bytes
    mac: bytes
    p2: int

    @property
    def permanent(self) -> bool:
        return self.p2 == P2_PERMANENT


def get_challenge_command(length: int = 4) -> Command:
    return Command(0x00, 0x84, 0x00, 0x00, le=length, name="GET CHALLENGE")


def application_block_command(mac: bytes, p2: int = P2_TEMPORARY) -> Command:
    if len(mac) != 4:
        raise ValueError(f"APPLICATION BLOCK MAC must be 4 bytes, not {len(mac)}")
    return Command(0x84, 0x1E, 0x00, p2, bytes(mac), name="APPLICATION BLOCK")


def block_mac_input(challenge: bytes, p2: int = P2_TEMPORARY, *, block: int = 8) -> bytes:
    """The 80 FA 05 data: IV = challenge(4) ‖ zeros, then ``84 1E 00 P2 04`` padded with 80 00…

    ``block`` is the cipher block: 8 for 3DES (Lc 10), 16 for SM4 (Lc 20).
    """
    if len(challenge) < 4:
        raise ValueError("GET CHALLENGE answered fewer than 4 bytes")
    iv = challenge[:4] + bytes(block - 4)
    message = bytes((0x84, 0x1E, 0x00, p2, 0x04)) + b"\x80"
    message += bytes(-len(message) % block)
    return iv + message


def get_challenge() -> Step[bytes]:
    """GET CHALLENGE: 4 random bytes of the card, the IV of the APPLICATION BLOCK MAC."""
    command = get_challenge_command()
    response = yield command
    return bytes(require(response, command, Party.CARD, length=4))


def application_block(mac: bytes, p2: int = P2_TEMPORARY) -> Step[None]:
    """APPLICATION BLOCK with the PSAM's MAC. Card refusals raise CardStatusError (e.g. 6988
    MAC incorrect, 6984 no challenge)."""
    command = application_block_command(mac, p2)
    response = yield command
    require(response, command, Party.CARD, length=0)
