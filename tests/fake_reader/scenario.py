"""Building blocks shared by the demo, the tests and the benchmarks: the demo profile's test
keys, a simulated PSAM, numbered cards of each family, and a tear-on-DEBIT wrapper."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.crypto import Algorithm
from agent.profile import Profile, load_profile
from agent.sam.keys import KeySet
from agent.sam.software import SamCore
from tests.fake_reader.cpu_card import (
    SimulatedCpuCard,
    make_cjt166_card,
    make_legacy_1001_card,
    make_tunion_card,
)
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.psam import SimulatedPsam

REPO = Path(__file__).resolve().parents[2]
DEMO_PROFILE = REPO / "firmware_profiles" / "test-city-demo.toml"
TERMINAL_NUMBER = bytes.fromhex("000000000024")
PSAM_SERIAL = bytes.fromhex("23010101000000212241")

Family = Literal["tunion", "cjt166", "legacy1001"]


def demo_profile() -> Profile:
    return load_profile(DEMO_PROFILE)


def demo_keyset(profile: Profile | None = None) -> KeySet:
    return KeySet.from_mapping((profile or demo_profile()).test_keys)


def make_psam(keyset: KeySet, *, ttc: int = 0) -> SimulatedPsam:
    return SimulatedPsam(SamCore(keyset, TERMINAL_NUMBER, PSAM_SERIAL, ttc=ttc))


def make_card(
    family: Family,
    number: int,
    keyset: KeySet,
    *,
    balance: int = 5000,
    algorithm: Algorithm = Algorithm.TDES,
    **options: object,
) -> SimulatedCpuCard:
    """Card ``number`` of ``family``: distinct ASN and UID per number."""
    asn = bytes.fromhex(f"51700701{number:08d}")
    if family == "tunion":
        return make_tunion_card(
            keyset=keyset,
            asn=asn,
            balance=balance,
            algorithm=algorithm,
            **options,  # type: ignore[arg-type]
        )
    if family == "cjt166":
        return make_cjt166_card(
            keyset=keyset,
            asn=asn,
            balance=balance,
            algorithm=algorithm,
            **options,  # type: ignore[arg-type]
        )
    issuer = bytes.fromhex("1000000000000000")
    return make_legacy_1001_card(
        keyset=keyset,
        asn=asn,
        balance=balance,
        algorithm=algorithm,
        issuer_id=issuer,
        factors=(asn, issuer),
        **options,  # type: ignore[arg-type]
    )


@dataclass
class TearOnDebit:
    """Wraps a card: the next DEBIT FOR PURCHASE (INS 54) is torn before or after its commit."""

    card: SimulatedCpuCard
    mode: Literal["tear_before", "tear_after"]
    armed: bool = True

    @property
    def uid(self) -> bytes:
        return self.card.uid

    @property
    def ats(self) -> bytes:
        return self.card.ats

    def power_on(self) -> None:
        self.card.power_on()

    def process(self, apdu: bytes) -> bytes:
        if self.armed and len(apdu) > 1 and apdu[1] == 0x54:
            self.armed = False
            if self.mode == "tear_before":
                raise CardTorn("card left before DEBIT")
            self.card.process(apdu)
            raise CardTorn("card left after DEBIT, answer lost")
        return self.card.process(apdu)
