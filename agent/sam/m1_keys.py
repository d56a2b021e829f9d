"""Per-card M1 sector keys (m1-purse-and-readers.md §3.3), one key per SECTOR. Keys are never
logged.

Back-ends, chosen by the profile's ``[m1_purse.keys] provider``; the inputs they send are built
by the pure functions of :mod:`agent.products.m1_keys` (which also documents them):

* ``psam_fc``       the PSAM's 80 FC (取M1卡密钥), 6 key bytes per input byte, several sectors in
                    one call (AFC) or one call each (CARDOP);
* ``psam_des``      the PSAM's general DES: 80 1A then 80 FA 05 00 twice per key [L];
* ``software_3des`` 3DES diversification in software (test profiles only: the master is in
                    the file);
* ``static``        one fixed key per sector or role (test profiles only: no security at all).

Every provider answers ``sector_keys(uid4, issuance, sectors) -> {sector: 6-byte key}``; a tap
asks for :meth:`agent.products.m1_layout.M1Layout.sectors_in_use`. Sectors sharing an input (all
record sectors of a role-keyed layout) cost one derivation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from agent.errors import ConfigurationError, SamProtocolError
from agent.products import m1_keys as inputs
from agent.products.m1_codec import Issuance
from agent.products.m1_layout import M1Layout
from agent.sam.base import Sam

KEY_SIZE = inputs.KEY_SIZE


@runtime_checkable
class M1KeyProvider(Protocol):
    """Sector keys of one card: sector number → 6-byte key."""

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, sectors: Sequence[int]
    ) -> dict[int, bytes]: ...


class PsamFcKeyProvider:
    """80 FC through the PSAM."""

    def __init__(self, sam: Sam, layout: M1Layout) -> None:
        self.sam = sam
        self.layout = layout

    def __repr__(self) -> str:
        config = self.layout.keys
        return f"PsamFcKeyProvider(p1={config.fc_p1:02X}, p2={config.fc_p2:02X})"

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, sectors: Sequence[int]
    ) -> dict[int, bytes]:
        config = self.layout.keys
        by_sector = inputs.sector_inputs(self.layout, sectors)
        keys: dict[bytes, bytes] = {}
        for batch in inputs.fc_batches(config, by_sector.values()):
            answer = self.sam.calculate_m1_keys(
                inputs.fc_data(config, uid4, issuance, batch), p1=config.fc_p1, p2=config.fc_p2
            )
            try:
                keys.update(inputs.split_fc_answer(answer, batch))
            except ValueError as exc:
                raise SamProtocolError(f"CALCULATE M1 KEYS: {exc}") from None
        return {sector: keys[one] for sector, one in by_sector.items()}


class PsamDesKeyProvider:
    """80 1A + 80 FA through the PSAM (UNCONFIRMED input layout, see agent.products.m1_keys)."""

    def __init__(self, sam: Sam, layout: M1Layout) -> None:
        self.sam = sam
        self.layout = layout

    def __repr__(self) -> str:
        config = self.layout.keys
        return f"PsamDesKeyProvider(p1={config.des_p1:02X}, p2={config.des_p2:02X})"

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, sectors: Sequence[int]
    ) -> dict[int, bytes]:
        config = self.layout.keys
        by_sector = inputs.sector_inputs(self.layout, sectors)
        keys: dict[bytes, bytes] = {}
        for one in dict.fromkeys(by_sector.values()):
            self.sam.cipher_init(
                config.des_p1, config.des_p2, inputs.des_factors(config, uid4, issuance, one)
            )
            first = self.sam.cipher_mac(inputs.des_mac_data(uid4, one, 1))
            second = self.sam.cipher_mac(inputs.des_mac_data(uid4, one, 2))
            if len(first) + len(second) < KEY_SIZE:
                raise SamProtocolError("CIPHER DATA: MACs too short for a 6-byte key")
            keys[one] = (first + second)[:KEY_SIZE]
        return {sector: keys[one] for sector, one in by_sector.items()}


class Software3DesKeyProvider:
    """3DES diversification of the UID in software (test profiles / cities without a PSAM)."""

    def __init__(self, layout: M1Layout) -> None:
        if len(layout.keys.software_master) != 16:
            raise ConfigurationError("software_3des needs a 16-byte master")
        self.layout = layout

    def __repr__(self) -> str:
        return "Software3DesKeyProvider(master=<redacted>)"

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, sectors: Sequence[int]
    ) -> dict[int, bytes]:
        config = self.layout.keys
        return {
            sector: inputs.software_3des_key(
                config.software_master, uid4, one, config.key_type.value
            )
            for sector, one in inputs.sector_inputs(self.layout, sectors).items()
        }


class StaticKeyProvider:
    """One fixed key per sector (or per role) from the profile (no security: test profiles)."""

    def __init__(self, layout: M1Layout) -> None:
        for sector in layout.sectors_in_use():
            if len(layout.static_key(sector)) != KEY_SIZE:
                raise ConfigurationError(f"static M1 keys: sector {sector} must be 6 bytes")
        self.layout = layout

    def __repr__(self) -> str:
        return "StaticKeyProvider(keys=<redacted>)"

    def sector_keys(
        self, uid4: bytes, issuance: Issuance, sectors: Sequence[int]
    ) -> dict[int, bytes]:
        return {sector: self.layout.static_key(sector) for sector in sectors}


def key_provider_for(layout: M1Layout, sam: Sam, *, production: bool) -> M1KeyProvider:
    """The provider the profile names; key material in a production profile is refused."""
    provider = layout.keys.provider
    if provider == "psam_fc":
        return PsamFcKeyProvider(sam, layout)
    if provider == "psam_des":
        return PsamDesKeyProvider(sam, layout)
    if production:
        raise ConfigurationError(
            f"m1_purse.keys: provider '{provider}' keeps keys in the profile and is "
            "refused by production profiles"
        )
    if provider == "software_3des":
        return Software3DesKeyProvider(layout)
    return StaticKeyProvider(layout)
