"""Pure inputs of M1 sector-key derivation (m1-purse-and-readers.md §3.3). No I/O: the key
providers that send these to a PSAM live in :mod:`agent.sam.m1_keys`.

What identifies a sector in the diversification input is the profile's
``[m1_purse.keys] sector_input``:

* ``id``            the sector's key id (``sector_ids``: an application id such as 02/03/06, not
                    the raw sector number) — CARDOP and AFC do this [H];
* ``sector``        the sector number instead of the id [L: not in the spec; for issuers whose
                    derivation takes the sector number];
* ``id_and_sector`` both, id first [L]; only where the input has room for two bytes
                    (``psam_des``, ``software_3des``): 80 FC takes one byte per key.

Per provider (the ``id`` forms are the ones of §3.3; the others replace the id byte by the
sector input bytes):

* ``psam_fc``       80 FC data = city ‖ UID ‖ serial low 2 ‖ card authentication code ‖ one input
                    byte per key [‖ city ‖ FF×6] (CARDOP / AFC) [H];
* ``psam_des``      80 1A factors (UID ‖ input ‖ 00.. to 8 bytes [, city ‖ FF×6]) then
                    80 FA 05 00 over UID ‖ input ‖ 01 and UID ‖ input ‖ 02; the key is the first
                    6 bytes of the two MACs [L: the real key-usage codes and input are
                    UNCONFIRMED];
* ``software_3des`` ``Div3DES(master, UID ‖ input ‖ key type ‖ 00..)[:6]`` (test profiles).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from agent import crypto
from agent.products.m1_codec import Issuance
from agent.products.m1_layout import KeyConfig, M1Layout

KEY_SIZE = 6


def sector_input(config: KeyConfig, sector: int, key_id: int) -> bytes:
    """The bytes that identify ``sector`` in the diversification input (module docstring)."""
    if not 0 <= sector <= 0xFF or not 0 <= key_id <= 0xFF:
        raise ValueError(f"sector {sector} / key id {key_id} is not one byte")
    if config.sector_input == "sector":
        return bytes((sector,))
    if config.sector_input == "id_and_sector":
        return bytes((key_id, sector))
    return bytes((key_id,))


def sector_inputs(layout: M1Layout, sectors: Iterable[int]) -> dict[int, bytes]:
    """Sector number → its input bytes, for the sectors asked for (in their order)."""
    return {sector: sector_input(layout.keys, sector, layout.key_id(sector)) for sector in sectors}


def fc_data(config: KeyConfig, uid4: bytes, issuance: Issuance, inputs: Sequence[bytes]) -> bytes:
    """The data field of one 80 FC: the 12-byte prefix, one input byte per key, the suffix."""
    for one in inputs:
        if len(one) != 1:
            raise ValueError("80 FC takes one input byte per sector key")
    data = (
        bytes(issuance.city_code)
        + bytes(uid4)
        + bytes(issuance.serial[-2:])
        + bytes(issuance.auth_code)
        + b"".join(inputs)
    )
    if config.fc_suffix == "city_ff":
        data += bytes(issuance.city_code) + b"\xff" * 6
    return data


def fc_batches(config: KeyConfig, inputs: Iterable[bytes]) -> list[list[bytes]]:
    """The distinct inputs grouped into 80 FC calls: all in one (AFC) or one each (CARDOP)."""
    unique = list(dict.fromkeys(inputs))
    return [unique] if config.fc_batch else [[one] for one in unique]


def split_fc_answer(answer: bytes, batch: Sequence[bytes]) -> dict[bytes, bytes]:
    """Input → 6-byte key from one 80 FC answer; ``ValueError`` if the length is wrong."""
    if len(answer) != KEY_SIZE * len(batch):
        raise ValueError(f"{len(answer)} bytes for {len(batch)} sector key(s)")
    return {one: answer[KEY_SIZE * i : KEY_SIZE * (i + 1)] for i, one in enumerate(batch)}


def des_factors(config: KeyConfig, uid4: bytes, issuance: Issuance, one: bytes) -> list[bytes]:
    """The 80 1A diversification factors of one sector key (``des_p1 >> 5`` levels)."""
    levels = config.des_p1 >> 5
    factors = [
        (bytes(uid4) + one).ljust(8, b"\x00")[:8],
        bytes(issuance.city_code) + b"\xff" * 6,
    ]
    return factors[:levels]


def des_mac_data(uid4: bytes, one: bytes, half: int) -> bytes:
    """The data of the ``half``-th (1, 2) 80 FA 05 00 of one key: zero IV ‖ padded input."""
    return bytes(8) + crypto.pad80(bytes(uid4) + one + bytes((half,)), 8)


def software_3des_key(
    master16: bytes, uid4: bytes, one: bytes | int, key_type: int = 0x60
) -> bytes:
    """``Div3DES(master, UID ‖ input ‖ key type ‖ 00..)[:6]`` (an int input is one key id)."""
    raw = bytes((one,)) if isinstance(one, int) else bytes(one)
    factor = (bytes(uid4) + raw + bytes((key_type,))).ljust(8, b"\x00")
    return crypto.diversify_3des(master16, factor)[:KEY_SIZE]
