"""Per-card M1 sector keys (m1-purse-and-readers.md §3.3). Keys are never logged.

Back-ends, chosen by the profile's ``[m1_purse.keys] provider``:

* ``psam_fc``       the PSAM's 80 FC (取M1卡密钥): city ‖ UID ‖ serial low 2 ‖ card
                    authentication code ‖ sector ids [‖ city ‖ FF×6], 6 key bytes per sector id
                    (CARDOP one id per call, AFC several).
* ``psam_des``      the PSAM's general DES: 80 1A (key usage P1, index P2, factors UID ‖ sector
                    id ‖ 00×3 [, city ‖ FF×6]) then 80 FA 05 00 twice; the key is the first six
                    bytes of the two MACs. The real P1/P2 codes and input are UNCONFIRMED [L]:
                    the Sam seam exposes only the MAC mode of 80 FA.
* ``software_3des`` ``Div3DES(master, UID ‖ sector id ‖ key type ‖ 00 00)[:6]``, for tests and
                    cities without PSAM derivation (test profiles only: the master is in the file).
* ``static``        one fixed key per role (test profiles only: no security at all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from agent import crypto
from agent.errors import ConfigurationError, SamProtocolError
from agent.products.m1_codec import Issuance
from agent.products.m1_layout import KEY_ROLES, KeyConfig, KeyRole, M1Layout
from agent.sam.base import Sam

KEY_SIZE = 6


@runtime_checkable
class M1KeyProvider(Protocol):
    """Sector keys of one card, by role (purse, public, records)."""

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, roles: Sequence[KeyRole] = KEY_ROLES
    ) -> dict[KeyRole, bytes]: ...


class PsamFcKeyProvider:
    """80 FC through the PSAM."""

    def __init__(self, sam: Sam, config: KeyConfig) -> None:
        self.sam = sam
        self.config = config

    def __repr__(self) -> str:
        return f"PsamFcKeyProvider(p1={self.config.fc_p1:02X}, p2={self.config.fc_p2:02X})"

    def _input(self, uid4: bytes, issuance: Issuance, ids: bytes) -> bytes:
        data = (
            bytes(issuance.city_code)
            + bytes(uid4)
            + bytes(issuance.serial[-2:])
            + bytes(issuance.auth_code)
            + ids
        )
        if self.config.fc_suffix == "city_ff":
            data += bytes(issuance.city_code) + b"\xff" * 6
        return data

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, roles: Sequence[KeyRole] = KEY_ROLES
    ) -> dict[KeyRole, bytes]:
        ids = [self.config.sector_ids[role] for role in roles]
        unique = list(dict.fromkeys(ids))
        keys_by_id: dict[int, bytes] = {}
        batches = [unique] if self.config.fc_batch else [[sid] for sid in unique]
        for batch in batches:
            answer = self.sam.calculate_m1_keys(
                self._input(uid4, issuance, bytes(batch)),
                p1=self.config.fc_p1,
                p2=self.config.fc_p2,
            )
            if len(answer) != KEY_SIZE * len(batch):
                raise SamProtocolError(
                    f"CALCULATE M1 KEYS: {len(answer)} bytes for {len(batch)} sector(s)"
                )
            for i, sid in enumerate(batch):
                keys_by_id[sid] = answer[KEY_SIZE * i : KEY_SIZE * (i + 1)]
        return {role: keys_by_id[self.config.sector_ids[role]] for role in roles}


class PsamDesKeyProvider:
    """80 1A + 80 FA through the PSAM (UNCONFIRMED input layout, see module docstring)."""

    def __init__(self, sam: Sam, config: KeyConfig) -> None:
        self.sam = sam
        self.config = config

    def __repr__(self) -> str:
        return f"PsamDesKeyProvider(p1={self.config.des_p1:02X}, p2={self.config.des_p2:02X})"

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, roles: Sequence[KeyRole] = KEY_ROLES
    ) -> dict[KeyRole, bytes]:
        levels = self.config.des_p1 >> 5
        keys: dict[KeyRole, bytes] = {}
        for role in roles:
            sid = self.config.sector_ids[role]
            factors = [bytes(uid4) + bytes((sid, 0, 0, 0)), bytes(issuance.city_code) + b"\xff" * 6]
            self.sam.cipher_init(self.config.des_p1, self.config.des_p2, factors[:levels])
            first = self.sam.cipher_mac(bytes(8) + crypto.pad80(bytes(uid4) + bytes((sid, 1)), 8))
            second = self.sam.cipher_mac(bytes(8) + crypto.pad80(bytes(uid4) + bytes((sid, 2)), 8))
            keys[role] = (first + second)[:KEY_SIZE]
        return keys


def software_3des_key(master16: bytes, uid4: bytes, sector_id: int, key_type: int = 0x60) -> bytes:
    """``Div3DES(master, UID ‖ sector id ‖ key type ‖ 00 00)[:6]``."""
    factor = bytes(uid4) + bytes((sector_id, key_type, 0, 0))
    return crypto.diversify_3des(master16, factor)[:KEY_SIZE]


class Software3DesKeyProvider:
    """3DES diversification of the UID in software (test profiles / cities without a PSAM)."""

    def __init__(self, config: KeyConfig) -> None:
        if len(config.software_master) != 16:
            raise ConfigurationError("software_3des needs a 16-byte master")
        self.config = config

    def __repr__(self) -> str:
        return "Software3DesKeyProvider(master=<redacted>)"

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, roles: Sequence[KeyRole] = KEY_ROLES
    ) -> dict[KeyRole, bytes]:
        return {
            role: software_3des_key(
                self.config.software_master,
                uid4,
                self.config.sector_ids[role],
                self.config.key_type.value,
            )
            for role in roles
        }


class StaticKeyProvider:
    """One fixed key per role (no security: test profiles only)."""

    def __init__(self, keys: Mapping[KeyRole, bytes]) -> None:
        for role in KEY_ROLES:
            if len(keys.get(role, b"")) != KEY_SIZE:
                raise ConfigurationError(f"static M1 keys: '{role}' must be 6 bytes")
        self._keys = dict(keys)

    def __repr__(self) -> str:
        return "StaticKeyProvider(keys=<redacted>)"

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, roles: Sequence[KeyRole] = KEY_ROLES
    ) -> dict[KeyRole, bytes]:
        return {role: self._keys[role] for role in roles}


def key_provider_for(layout: M1Layout, sam: Sam, *, production: bool) -> M1KeyProvider:
    """The provider the profile names; key material in a production profile is refused."""
    config = layout.keys
    if config.provider == "psam_fc":
        return PsamFcKeyProvider(sam, config)
    if config.provider == "psam_des":
        return PsamDesKeyProvider(sam, config)
    if production:
        raise ConfigurationError(
            f"m1_purse.keys: provider '{config.provider}' keeps keys in the profile and is "
            "refused by production profiles"
        )
    if config.provider == "software_3des":
        return Software3DesKeyProvider(config)
    return StaticKeyProvider(config.static_keys)
