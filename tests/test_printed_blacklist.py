"""Blacklists by printed card number (issue 15, "blacklists accept either form").

A printed number (what the operator or the customer reads on the card: Shenzhen Tong 881146306)
lives in a key space of its own: its own signed list (``CBLPRN03``), its own local file, its own
lookup. The tests show the two spaces never meet, the host keeps both in one version chain and
publishes each as its own list, and the whole path: an operator lists 881146306 with
``cardhost blacklist --printed``, the daemon pulls it, the agent locks the Shenzhen Tong card
with that printed number at the tap (shipped dialect, simulated card, real PSAM steps).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.blacklist import (
    BLACKLIST_FILE,
    KIND_SNAPSHOT,
    PRINTED_BLACKLIST_FILE,
    SPACE_PRINTED,
    SPACE_SERIAL,
    Blacklist,
    BlacklistRejected,
    CardBlacklist,
    decode_list,
    encode_list,
    printed_key,
)
from agent.profile import load_dialects, standard_dialects
from agent.runner import _open_blacklist
from agent.sam.keys import KeySet
from agent.sam.router import SingleSamRouter
from agent.transaction import TransactionEngine
from agent.wiring import DataDir
from clearinghost.local import start_local_sync
from clearinghost.storage import SqliteStorage
from tests.fake_reader.cpu_card import SimulatedCpuCard, make_legacy_1001_card
from tests.rig import Rig

ROOT = Path(__file__).resolve().parent.parent
CHINA_CITIES = ROOT / "firmware_profiles" / "dialects" / "china-cities.toml"
SZT_PRINTED = "881146306"  # little-endian C2 39 85 34 at EF15[16..19] (Metrodroid's reading)


def _signer() -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _snapshot(space: str, keys: list[int], key: Ed25519PrivateKey, public: bytes) -> bytes:
    now = int(time.time())
    return encode_list(
        kind=KIND_SNAPSHOT,
        version=1,
        base_version=0,
        issued_at=now,
        expires_at=now + 3600,
        add=keys,
        sign=key.sign,
        public_key_raw=public,
        space=space,
    )


# --- the printed key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "key"),
    [
        ("881146306", 881146306),
        ("8811 4630 6", 881146306),  # as printed in groups
        ("0881146306", 881146306),  # leading zeros do not count
        ("3105170010170907984", 3105170010170907984),  # a T-Union number: 19 digits
        ("9" * 19, 10**19 - 1),
    ],
)
def test_printed_key_is_the_numbers_value(number: str, key: int) -> None:
    assert printed_key(number) == key


@pytest.mark.parametrize(
    ("number", "message"),
    [
        ("", "is not decimal digits"),
        ("51800000A344C213", "is not decimal digits"),  # a hex serial is not a printed number
        ("12-34", "is not decimal digits"),
        ("١٢٣", "is not decimal digits"),  # non-ASCII digits
        ("1" * 20, "has 20 digits, at most 19"),
    ],
)
def test_printed_key_refuses_what_is_not_a_printed_number(number: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        printed_key(number)


# --- two key spaces that never meet ------------------------------------------------------------


def test_a_list_of_one_space_is_refused_as_the_other() -> None:
    """The magic is signed: a serial list cannot be replayed as a printed-number list, nor the
    reverse, and the refusal says which list it was."""
    key, public = _signer()
    serial = _snapshot(SPACE_SERIAL, [881146306], key, public)
    printed = _snapshot(SPACE_PRINTED, [881146306], key, public)
    assert decode_list(serial, public).added() == [881146306]
    assert decode_list(printed, public, SPACE_PRINTED).added() == [881146306]
    with pytest.raises(BlacklistRejected, match="a serial-number list where a printed"):
        decode_list(serial, public, SPACE_PRINTED)
    with pytest.raises(BlacklistRejected, match="a printed-number list where a serial"):
        decode_list(printed, public)


def _lists(tmp_path: Path, serial: list[int], printed: list[int]) -> CardBlacklist:
    key, public = _signer()
    tmp_path.mkdir(parents=True, exist_ok=True)
    lists = []
    for name, space, keys in (
        (BLACKLIST_FILE, SPACE_SERIAL, serial),
        (PRINTED_BLACKLIST_FILE, SPACE_PRINTED, printed),
    ):
        listed = Blacklist(tmp_path / name, space=space)
        listed.apply(_snapshot(space, keys, key, public), public)
        lists.append(listed)
    return CardBlacklist(*lists)


def test_a_printed_number_never_matches_a_raw_serial(tmp_path: Path) -> None:
    """The same integer listed in one space is not listed in the other: an ASN whose value is
    881146306 does not list the card printed 881146306, and the reverse."""
    by_serial = _lists(tmp_path / "a", serial=[881146306], printed=[])
    assert by_serial.contains(f"{881146306:020X}")
    assert not by_serial.contains_printed(SZT_PRINTED)
    by_printed = _lists(tmp_path / "b", serial=[], printed=[881146306])
    assert by_printed.contains_printed(SZT_PRINTED)
    assert by_printed.contains_printed("8811 4630 6")
    assert not by_printed.contains(f"{881146306:020X}")
    assert not by_printed.contains_printed("881146307")
    # a number that cannot be listed (a hex serial shown as the number) is simply not listed
    assert not by_printed.contains_printed("51800000A344C213")


@settings(deadline=None, max_examples=40)
@given(
    serials=st.sets(st.integers(0, 2**64 - 1), max_size=20),
    printed=st.sets(st.integers(0, 10**19 - 1), max_size=20),
    probe=st.integers(0, 10**19 - 1),
)
def test_each_space_answers_only_for_its_own_entries(
    tmp_path_factory: pytest.TempPathFactory, serials: set[int], printed: set[int], probe: int
) -> None:
    lists = _lists(tmp_path_factory.mktemp("lists"), sorted(serials), sorted(printed))
    assert lists.contains_printed(str(probe)) == (probe in printed)
    assert lists.contains(f"{probe:016X}") == (probe in serials)
    for number in printed:
        assert lists.contains_printed(str(number))
    for asn in serials:
        assert lists.contains(f"{asn:016X}")


def test_the_agent_reads_a_data_dir_with_only_the_old_list(tmp_path: Path) -> None:
    """A data directory from before printed numbers (blacklist.bin only) keeps working: the
    printed-number list is empty until the daemon pulls one."""
    key, public = _signer()
    old = Blacklist(tmp_path / BLACKLIST_FILE)
    old.apply(_snapshot(SPACE_SERIAL, [0x51800000A344C213], key, public), public)
    view = _open_blacklist(DataDir(tmp_path))
    assert view.contains("000051800000A344C213")
    assert not view.contains_printed(SZT_PRINTED)
    assert view.printed.version == 0 and not view.is_expired()


# --- the host: one version chain, two lists ----------------------------------------------------


def test_host_storage_keeps_the_spaces_apart(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "host.db")
    try:
        v1 = storage.publish_blacklist([881146306], [])
        v2 = storage.publish_blacklist([], [], printed_add=[881146306, 42])
        v3 = storage.publish_blacklist([], [], printed_remove=[42])
        assert (v1, v2, v3) == (1, 2, 3)
        assert storage.blacklist_snapshot() == (3, [881146306])
        assert storage.blacklist_snapshot(SPACE_PRINTED) == (3, [881146306])
        assert storage.blacklist_delta(1, SPACE_PRINTED) == (3, [881146306], [])
        assert storage.blacklist_delta(1) == (3, [], [])
        assert storage.blacklist_delta(2, SPACE_PRINTED) == (3, [], [42])
        # held for a second operator: the printed entries survive the wait
        held = storage.propose_blacklist([], [], "ops-a", printed_add=[7])
        assert storage.decide_blacklist(held, "ops-b", approve=True) == 4
        assert storage.blacklist_snapshot(SPACE_PRINTED) == (4, [7, 881146306])
    finally:
        storage.close()


def test_the_daemon_pulls_printed_deltas_and_refuses_a_serial_list_in_their_place(
    tmp_path: Path,
) -> None:
    """The printed-number list follows the host's version chain by deltas (added, removed);
    an answer of the wrong space (an old host that ignores ``space``) is refused at its first
    bytes, saying so, and the serial list, a job of its own, goes on."""
    from clearinghost.keys import HostKey
    from clearinghost.server import HostServer, create_app
    from sync.errors import ProtocolError
    from tests.test_sync_support import Terminal, daemon_for, fast_settings, make_host

    key = HostKey.generate()
    terminal = Terminal.provision(tmp_path, "BUS-PRN")
    host = make_host(SqliteStorage(tmp_path / "host.db"), key)
    try:
        with HostServer(create_app(host)) as server:
            daemon = daemon_for(terminal, fast_settings(server.url, key))
            try:
                printed = daemon.printed_blacklist
                assert printed is not None
                host.storage.publish_blacklist([0x42], [], printed_add=[881146306, 7])
                daemon.pull_blacklist()
                assert printed.version == 0  # a job of its own
                assert daemon.pull_printed_blacklist() is not None
                assert printed.version == 1 and printed.count == 2
                host.storage.publish_blacklist([], [], printed_remove=[7])
                daemon.pull_blacklist()
                result = daemon.pull_printed_blacklist()
                assert result is not None and result.kind == "delta" and result.removed == 1
                assert printed.version == 2 and printed.count == 1
                view = _open_blacklist(DataDir(terminal.data_dir))
                assert view.contains_printed(SZT_PRINTED) and not view.contains_printed("7")
                assert view.contains(f"{0x42:016X}") and view.version == 2

                serial_only = host.blacklist_document

                def old_host(since: int, space: str = SPACE_SERIAL) -> bytes:
                    return serial_only(since)  # a host that ignores ?space=

                host.blacklist_document = old_host  # type: ignore[method-assign]
                host.storage.publish_blacklist([0x43], [])
                with pytest.raises(ProtocolError, match="a serial-number list where a printed"):
                    daemon.pull_printed_blacklist()
                assert daemon.pull_blacklist() is not None  # the serial list is not held back
                assert daemon.blacklist.version == 3 and printed.version == 2
            finally:
                daemon.close()
    finally:
        host.storage.close()
        terminal.store.close()


# --- end to end: operator, host, daemon, agent, card ------------------------------------------


def shenzhen_tong_card(keyset: KeySet, printed: str) -> SimulatedCpuCard:
    """A simulated Shenzhen Tong card (ADF 1001, DF name PAY.SZT, 32-byte EF15 as the real
    recording's) whose printed number is ``printed``: little-endian at EF15[16..19]."""
    asn = bytes.fromhex("51800000") + int(printed).to_bytes(4, "little")
    issuer = bytes.fromhex("1000000000000000")  # as tests.fake_reader.scenario.make_card
    card = make_legacy_1001_card(
        keyset=keyset,
        asn=asn,
        balance=5000,
        issuer_id=issuer,
        factors=(asn, issuer),
        df_name=b"PAY.SZT",
    )
    card.binaries[0x15] = card.binaries[0x15] + bytes(2)  # 30 -> 32 bytes, as PAY.SZT has
    return card


def test_operator_blacklists_a_printed_number_and_the_agent_locks_the_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cardhost blacklist --printed add 881146306`` at the real host (HTTP on 127.0.0.1);
    the daemon pulls the printed-number list; the agent's view of the data directory (as
    ``cardagent run`` opens it) finds the Shenzhen Tong card by its printed number and the tap
    locks it (APPLICATION BLOCK through the PSAM), while a card printed otherwise pays."""
    from clearinghost import cli as host_cli
    from clearinghost.operators import TOKEN_ENV

    monkeypatch.setattr(host_cli, "configure_logging", lambda *args: None)
    data_dir = tmp_path / "bus"
    DataDir(data_dir).provision("BUS-SZT")
    sync = start_local_sync(data_dir, blacklist_interval_s=0.3)
    try:
        monkeypatch.setenv(TOKEN_ENV, sync.operator_token)
        bad = ["blacklist", "--host", sync.url, "--printed", "add", "51800000A344C213"]
        assert host_cli.main(bad) == 2  # a hex serial is not a printed number: refused
        add = ["blacklist", "--host", sync.url, "--printed", "add", SZT_PRINTED]
        assert host_cli.main(add) == 0
        version = sync.host.storage.blacklist_version()
        assert sync.host.storage.blacklist_snapshot(SPACE_PRINTED) == (version, [881146306])
        agent_view = _open_blacklist(DataDir(data_dir))
        published = time.monotonic()
        while not agent_view.contains_printed(SZT_PRINTED):
            # a hang bound, not a speed claim (the pull interval is 0.3 s; CI is loaded)
            assert time.monotonic() - published < 60.0, "the printed number never arrived"
            time.sleep(0.05)
        assert sync.daemon.printed_blacklist is not None
        assert sync.daemon.printed_blacklist.version == version
        assert (data_dir / PRINTED_BLACKLIST_FILE).exists()
        assert "printed_blacklist_version" in sync.daemon.health()

        rig = Rig(tmp_path / "rig", dialects=(*load_dialects(CHINA_CITIES), *standard_dialects()))
        try:
            rig.engine = TransactionEngine(rig.profile, rig.store, rig.sam, blacklist=agent_view)
            listed = shenzhen_tong_card(rig.keyset, SZT_PRINTED)
            outcome = rig.tap(listed)
            assert outcome.status == "refused" and outcome.reason.startswith("blacklisted")
            assert outcome.printed_number == SZT_PRINTED
            assert not agent_view.contains(outcome.card_id)  # listed by the number only
            assert listed.lock_state == "temporary"
            [lock] = rig.records(kind="lock")
            assert lock.fields["printed_number"] == SZT_PRINTED
            again = rig.tap(listed)
            assert again.reason.startswith("card_locked")
            other = rig.tap(shenzhen_tong_card(rig.keyset, "881146307"))
            assert other.status == "paid", other.reason
            assert rig.store.verify().ok
        finally:
            rig.close()
    finally:
        sync.stop()


def test_host_refuses_bad_printed_numbers_and_spaces(tmp_path: Path) -> None:
    data_dir = tmp_path / "bus"
    DataDir(data_dir).provision("BUS-BAD")
    sync = start_local_sync(data_dir, blacklist_interval_s=30.0)
    try:
        headers = {"Authorization": f"Bearer {sync.operator_token}"}
        answer = httpx.post(
            f"{sync.url}/v1/admin/blacklist",
            json={"printed_add": ["0x1234"]},
            headers=headers,
            timeout=10,
        )
        assert answer.status_code == 400
        assert answer.json()["error"] == "bad_printed_number"
        assert "printed_add" in answer.json()["detail"]
        listing = httpx.get(f"{sync.url}/v1/blacklist", params={"space": "uid"}, timeout=10)
        assert listing.status_code == 400
        assert "space must be serial or printed" in listing.json()["detail"]
        printed = httpx.get(f"{sync.url}/v1/blacklist", params={"space": "printed"}, timeout=10)
        assert printed.status_code == 200 and printed.content.startswith(b"CBLPRN03")
        serial = httpx.get(f"{sync.url}/v1/blacklist", timeout=10)
        assert serial.status_code == 200 and serial.content.startswith(b"CBLIST03")
    finally:
        sync.stop()


def test_read_card_shows_a_listed_printed_number_at_the_pos(tmp_path: Path) -> None:
    """The POS card view (agent.pos.card_info) says a card is blacklisted by its number."""
    from agent.pos.card_info import read_card

    rig = Rig(tmp_path / "rig", dialects=(*load_dialects(CHINA_CITIES), *standard_dialects()))
    try:
        lists = _lists(tmp_path / "lists", serial=[], printed=[881146306])
        card = shenzhen_tong_card(rig.keyset, SZT_PRINTED)
        rig.field.insert(card)
        presence = rig.reader.wait_for_card(0)
        assert presence is not None
        today = dt.date(2026, 1, 1)
        sams = SingleSamRouter(rig.sam)
        shown = read_card(rig.reader, presence, rig.profile, sams, lists, today)
        assert shown["status"] == "blacklisted"
        assert "printed number" in shown["reason"]
        unlisted = _lists(tmp_path / "none", serial=[], printed=[881146307])
        shown = read_card(rig.reader, presence, rig.profile, sams, unlisted, today)
        assert shown["status"] == "ok", shown
    finally:
        rig.close()
