"""The engine applies the sync daemon's outputs: blacklist (lock + record) and parameter sets."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from structlog.testing import capture_logs

from agent.blacklist import KIND_SNAPSHOT, Blacklist, asn_of, encode_list
from agent.params import ActiveParams
from clearinghost.keys import HostKey, sign_params
from tests.fake_reader.scenario import make_card
from tests.rig import Rig


class ListedCards:
    def __init__(self, *card_ids: str) -> None:
        self.card_ids = set(card_ids)

    def contains(self, card_id: str) -> bool:
        return card_id in self.card_ids


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path / "rig")
    yield rig
    rig.close()


@pytest.mark.parametrize("family", ["tunion", "cjt166", "legacy1001"])
def test_blacklisted_cpu_card_is_locked_recorded_and_refused(rig: Rig, family: str) -> None:
    """APPLICATION BLOCK through the PSAM, a lock record, no debit; then SELECT says locked."""
    card = make_card(family, 1, rig.keyset, balance=5000)  # type: ignore[arg-type]
    card_id = rig.tap(card).card_id  # learn the id with a normal paid tap
    rig.engine.blacklist = ListedCards(card_id)
    outcome = rig.tap(card)
    assert outcome.status == "refused"
    assert outcome.reason.startswith("blacklisted")
    locks = rig.records(kind="lock")
    assert [r.card_id for r in locks] == [card_id]
    assert locks[0].fields["lock"] == "temporary"
    assert len(card.debits) == 1  # only the first, paid tap
    again = rig.tap(card)
    assert again.status == "refused"
    assert "card_locked" in again.reason
    assert len(rig.records(kind="lock")) == 1
    assert rig.store.verify().ok


def test_pending_debit_is_settled_before_the_lock(rig: Rig) -> None:
    """A card torn after its debit and then blacklisted: the debit is recorded, then the lock."""
    card = make_card("tunion", 2, rig.keyset, balance=5000)
    card.reset_command_count()
    card.faults.add(7, "tear_after")
    assert rig.tap(card).status == "torn"
    rig.engine.blacklist = ListedCards(rig.store.pending_intents()[0].card_id)
    outcome = rig.tap(card)
    assert outcome.status == "recovered"
    assert [r.kind for r in rig.records()] == ["purchase"]
    assert rig.tap(card).reason.startswith("blacklisted")
    assert [r.kind for r in rig.records()] == ["purchase", "lock"]


HOST_KEY = HostKey.generate()  # TEST KEY ONLY


def write_params(path: Path, **payload: object) -> None:
    now = int(time.time())
    body: dict[str, object] = {
        "version": 1,
        "issued_at": now - 10,
        "expires_at": now + 3600,
        "effective_from": now,
    }
    body.update(payload)
    path.write_bytes(sign_params(body, HOST_KEY))


def test_parameter_set_in_force_sets_the_fare(rig: Rig, tmp_path: Path) -> None:
    """A fare table in force replaces the profile's flat fare; outside its window it does not."""
    path = tmp_path / "params.json"
    rig.engine.params = ActiveParams(path, HOST_KEY.public_key_bytes)
    card = make_card("cjt166", 3, rig.keyset, balance=5000)
    write_params(path, fare_table={"flat_fare": 150})
    assert rig.tap(card).fare == 150
    write_params(
        path, version=2, fare_table={"flat_fare": 175}, effective_from=int(time.time()) + 600
    )
    assert rig.tap(card).fare == rig.profile.flat_fare
    path.write_text("{corrupt")
    assert rig.tap(card).fare == rig.profile.flat_fare
    assert card.balance == 5000 - 150 - 2 * rig.profile.flat_fare


def test_parameter_set_allow_list_refuses_other_issuers(rig: Rig, tmp_path: Path) -> None:
    """An issuer allow-list in force that leaves out the card's issuer refuses it."""
    path = tmp_path / "params.json"
    rig.engine.params = ActiveParams(path, HOST_KEY.public_key_bytes)
    write_params(path, issuer_allow_list=["02012000"])
    outcome = rig.tap(make_card("tunion", 4, rig.keyset, balance=5000))
    assert outcome.status == "refused"
    assert outcome.reason.startswith("issuer_not_accepted")


def test_parameter_set_fare_applies_to_m1_cards(rig: Rig, tmp_path: Path) -> None:
    """The engine hands the fare in force to the M1 handler too."""
    from tests.fake_reader.m1_readers import InProcessM1Reader, M1Field, presence_of
    from tests.fake_reader.scenario import make_m1_card

    path = tmp_path / "params.json"
    rig.engine.params = ActiveParams(path, HOST_KEY.public_key_bytes)
    write_params(path, fare_table={"flat_fare": 120})
    card = make_m1_card(401, balance=1000)
    field = M1Field()
    field.insert(card)
    outcome = rig.engine.process_tap(InProcessM1Reader(field), presence_of(card))
    assert outcome.status == "paid", outcome
    assert outcome.fare == 120
    assert outcome.balance_after == 880


# --- an expired blacklist: the profile's [blacklist] expired_policy (issue 9) ------------------


def expired_list(path: Path, *listed: str) -> Blacklist:
    """A real blacklist file whose list expired an hour ago (applied while it was fresh)."""
    key = Ed25519PrivateKey.generate()  # TEST KEY ONLY
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    issued = int(time.time()) - 7200
    document = encode_list(
        kind=KIND_SNAPSHOT,
        version=3,
        base_version=0,
        issued_at=issued,
        expires_at=issued + 3600,
        add=[asn_of(card_id) for card_id in listed],
        sign=key.sign,
        public_key_raw=public,
    )
    blacklist = Blacklist.open(path, auto_refresh_s=None)
    blacklist.apply(document, public, now=issued)
    return blacklist


def with_policy(rig: Rig, policy: str, issuers: tuple[str, ...] = ()) -> None:
    rig.engine.profile = dataclasses.replace(
        rig.profile, blacklist_expired_policy=policy, blacklist_expired_refuse_issuers=issuers
    )


def test_expired_blacklist_keep_and_alarm_serves_cards_on_the_last_list(
    rig: Rig, tmp_path: Path
) -> None:
    """The default: the last list stays in force (a listed card is still locked), other cards
    pay, and every tap on the expired list logs an alarm."""
    listed = make_card("tunion", 11, rig.keyset, balance=5000)
    card_id = rig.tap(listed).card_id
    rig.engine.blacklist = expired_list(tmp_path / "blacklist.bin", card_id)
    with capture_logs() as logs:
        other = rig.tap(make_card("legacy1001", 12, rig.keyset, balance=5000))
        locked = rig.tap(listed)
    assert other.status == "paid", other
    assert locked.reason.startswith("blacklisted")
    alarms = [e for e in logs if e["event"] == "blacklist_expired_alarm"]
    assert alarms and alarms[0]["policy"] == "keep_and_alarm" and not alarms[0]["refused"]


def test_expired_blacklist_refuse_issuers_refuses_only_those_issuers(
    rig: Rig, tmp_path: Path
) -> None:
    """``refuse_issuers``: cards of the listed issuers are refused ``blacklist_expired``
    without being touched; cards of other issuers pay."""
    with_policy(rig, "refuse_issuers", ("10000000",))  # the ADF 1001 issuer
    rig.engine.blacklist = expired_list(tmp_path / "blacklist.bin")
    refused_card = make_card("legacy1001", 13, rig.keyset, balance=5000)
    refused = rig.tap(refused_card)
    assert refused.status == "refused" and refused.reason.startswith("blacklist_expired")
    assert refused_card.balance == 5000
    assert rig.tap(make_card("tunion", 14, rig.keyset, balance=5000)).status == "paid"
    rig.engine.blacklist = None  # a fresh list (here: none) serves the issuer again
    assert rig.tap(refused_card).status == "paid"


def test_expired_blacklist_refuse_all_refuses_every_card(rig: Rig, tmp_path: Path) -> None:
    with_policy(rig, "refuse_all")
    rig.engine.blacklist = expired_list(tmp_path / "blacklist.bin")
    for family, n in (("tunion", 15), ("cjt166", 16)):
        outcome = rig.tap(make_card(family, n, rig.keyset, balance=5000))  # type: ignore[arg-type]
        assert outcome.reason.startswith("blacklist_expired"), outcome
    assert rig.records() == []
