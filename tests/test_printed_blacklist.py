"""Blacklists by printed card number (issue 15, "blacklists accept either form"), scoped by
issuer.

A printed number (what the operator or the customer reads on the card: Shenzhen Tong 881146306)
lives in a key space of its own: its own signed list (``CBLPRN04``), its own local file, its own
lookup; and it is unique only within its issuer, so an entry is issuer (city code) + number and a
card matches only its own issuer's entries. The tests show the two spaces never meet, issuers
never meet, the host keeps both spaces in one version chain and publishes each as its own list,
an old unscoped list (``CBLPRN03``, its file) is refused or never read, and the whole path: an
operator lists 881146306 of Shenzhen Tong with ``cardhost blacklist --printed --issuer``, the
daemon pulls it, the agent locks the Shenzhen Tong card with that printed number at the tap
(shipped dialect, simulated card, real PSAM steps) while another issuer's card printed
881146306 pays.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import replace
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
    UNSCOPED_PRINTED_FILE,
    Blacklist,
    BlacklistRejected,
    CardBlacklist,
    decode_list,
    encode_list,
    printed_entry,
    printed_key,
)
from agent.profile import Dialect, load_dialects, standard_dialects
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
SZT = "5180"  # the shenzhen-tong dialect's issuer_city (china-cities.toml)
OTHER = "2000"  # another issuer's city code
SZT_KEY = (0x5180 << 48) | 881146306


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
    ("issuer", "number", "key"),
    [
        (SZT, "881146306", SZT_KEY),
        (SZT, "8811 4630 6", SZT_KEY),  # as printed in groups
        (SZT, "0881146306", SZT_KEY),  # leading zeros do not count
        (" 5180 ", "881146306", SZT_KEY),
        (OTHER, "881146306", (0x2000 << 48) | 881146306),  # another issuer, another key
        ("0000", "0", 0),
        ("9999", "9" * 14, (0x9999 << 48) | (10**14 - 1)),
        (SZT, "000" + "9" * 14, (0x5180 << 48) | (10**14 - 1)),  # zeros are not digits listed
    ],
)
def test_printed_key_is_issuer_then_number(issuer: str, number: str, key: int) -> None:
    """The issuer's city code as BCD in the top 16 bits (the packed list's bucket), the
    number's value in the low 48; read back by printed_entry."""
    assert printed_key(issuer, number) == key
    assert printed_entry(key) == (issuer.strip(), str(int("".join(number.split()))))


@pytest.mark.parametrize(
    ("issuer", "number", "message"),
    [
        (SZT, "", "is not decimal digits"),
        (SZT, "51800000A344C213", "is not decimal digits"),  # a hex serial is no printed number
        (SZT, "12-34", "is not decimal digits"),
        (SZT, "١٢٣", "is not decimal digits"),  # non-ASCII digits
        (SZT, "1" * 15, "has 15 digits, at most 14 are listed with an issuer"),
        (SZT, "3105170010170907984", "has 19 digits.*is the card's serial"),  # T-Union
        ("", "881146306", "issuer '' is not a 4-digit city code"),
        ("518", "881146306", "issuer '518' is not a 4-digit city code"),
        ("51800", "881146306", "issuer '51800' is not a 4-digit city code"),
        ("51A0", "881146306", "issuer '51A0' is not a 4-digit city code"),
        ("shenzhen-tong", "881146306", "is not a 4-digit city code"),
    ],
)
def test_printed_key_refuses_what_is_not_an_issuer_and_number(
    issuer: str, number: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        printed_key(issuer, number)


@given(
    issuer=st.integers(0, 9999),
    number=st.integers(0, 10**14 - 1),
    other=st.integers(0, 9999),
)
def test_keys_of_two_issuers_never_meet_and_sort_by_issuer(
    issuer: int, number: int, other: int
) -> None:
    key = printed_key(f"{issuer:04d}", str(number))
    assert printed_entry(key) == (f"{issuer:04d}", str(number))
    assert key >> 48 == int(f"{issuer:04d}", 16)  # the bucket is the issuer
    if other != issuer:
        assert printed_key(f"{other:04d}", str(number)) != key
        assert (printed_key(f"{other:04d}", "0") < key) == (other < issuer)


# --- two key spaces that never meet ------------------------------------------------------------


def test_a_list_of_one_space_is_refused_as_the_other() -> None:
    """The magic is signed: a serial list cannot be replayed as a printed-number list, nor the
    reverse, and the refusal says which list it was."""
    key, public = _signer()
    serial = _snapshot(SPACE_SERIAL, [881146306], key, public)
    printed = _snapshot(SPACE_PRINTED, [SZT_KEY], key, public)
    assert decode_list(serial, public).added() == [881146306]
    assert decode_list(printed, public, SPACE_PRINTED).added() == [SZT_KEY]
    assert printed.startswith(b"CBLPRN04")
    with pytest.raises(BlacklistRejected, match="a serial-number list where a printed"):
        decode_list(serial, public, SPACE_PRINTED)
    with pytest.raises(BlacklistRejected, match="a printed-number list where a serial"):
        decode_list(printed, public)


def test_an_unscoped_printed_list_is_refused_by_name(tmp_path: Path) -> None:
    """An old host's CBLPRN03 list (entries: the numbers alone) is refused at its first bytes,
    saying why: its entries name no issuer."""
    key, public = _signer()
    old = b"CBLPRN03" + _snapshot(SPACE_PRINTED, [881146306], key, public)[8:]
    with pytest.raises(BlacklistRejected, match=r"unscoped printed-number list \(CBLPRN03"):
        decode_list(old, public, SPACE_PRINTED)
    with pytest.raises(BlacklistRejected, match="unscoped printed-number list"):
        Blacklist(tmp_path / PRINTED_BLACKLIST_FILE, space=SPACE_PRINTED).incoming().feed(old[:8])


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
    the printed key does not list the card printed 881146306, and the reverse."""
    by_serial = _lists(tmp_path / "a", serial=[SZT_KEY, 881146306], printed=[])
    assert by_serial.contains(f"{SZT_KEY:020X}")
    assert not by_serial.contains_printed(SZT, SZT_PRINTED)
    by_printed = _lists(tmp_path / "b", serial=[], printed=[SZT_KEY])
    assert by_printed.contains_printed(SZT, SZT_PRINTED)
    assert by_printed.contains_printed(SZT, "8811 4630 6")
    assert not by_printed.contains(f"{SZT_KEY:020X}")
    assert not by_printed.contains(f"{881146306:020X}")
    assert not by_printed.contains_printed(SZT, "881146307")
    # a number that cannot be listed (a hex serial shown as the number) is simply not listed
    assert not by_printed.contains_printed(SZT, "51800000A344C213")


def test_a_printed_number_matches_only_its_own_issuer(tmp_path: Path) -> None:
    """Shenzhen Tong 881146306 is listed; another issuer's card printed 881146306 is not, nor
    is a card that yields no issuer code."""
    lists = _lists(tmp_path, serial=[], printed=[SZT_KEY])
    assert lists.contains_printed(SZT, SZT_PRINTED)
    assert not lists.contains_printed(OTHER, SZT_PRINTED)
    assert not lists.contains_printed("0000", SZT_PRINTED)
    assert not lists.contains_printed("", SZT_PRINTED)
    assert lists.printed.contains(f"{SZT}:{SZT_PRINTED}")
    assert not lists.printed.contains(f"{OTHER}:{SZT_PRINTED}")


_ISSUERS = st.sampled_from(["1000", "2000", "3100", "5180", "5840", "0000", "9999"])
_NUMBERS = st.integers(0, 10**14 - 1)


@settings(deadline=None, max_examples=40)
@given(
    serials=st.sets(st.integers(0, 2**64 - 1), max_size=20),
    printed=st.sets(st.tuples(_ISSUERS, _NUMBERS), max_size=20),
    probe=st.tuples(_ISSUERS, _NUMBERS),
)
def test_each_space_and_issuer_answers_only_for_its_own_entries(
    tmp_path_factory: pytest.TempPathFactory,
    serials: set[int],
    printed: set[tuple[str, int]],
    probe: tuple[str, int],
) -> None:
    keys = sorted(printed_key(issuer, str(number)) for issuer, number in printed)
    lists = _lists(tmp_path_factory.mktemp("lists"), sorted(serials), keys)
    assert lists.contains_printed(probe[0], str(probe[1])) == (probe in printed)
    assert lists.contains(f"{probe[1]:016X}") == (probe[1] in serials)
    for issuer, number in printed:
        assert lists.contains_printed(issuer, str(number))
    for asn in serials:
        assert lists.contains(f"{asn:016X}")


def test_the_agent_reads_a_data_dir_with_only_the_old_lists(tmp_path: Path) -> None:
    """A data directory from before printed numbers (blacklist.bin only), or before issuer
    scoping (an unscoped blacklist-printed.bin too), keeps its serial list working; the old
    printed-number file is never read (its key 881146306 would read as issuer 0000), so the
    printed-number list is empty until the daemon pulls an issuer-scoped one."""
    key, public = _signer()
    old = Blacklist(tmp_path / BLACKLIST_FILE)
    old.apply(_snapshot(SPACE_SERIAL, [0x51800000A344C213], key, public), public)
    view = _open_blacklist(DataDir(tmp_path))
    assert view.contains("000051800000A344C213")
    assert not view.contains_printed(SZT, SZT_PRINTED)
    assert view.printed.version == 0 and not view.is_expired()
    unscoped = Blacklist(tmp_path / UNSCOPED_PRINTED_FILE, space=SPACE_PRINTED)
    unscoped.apply(_snapshot(SPACE_PRINTED, [881146306], key, public), public)
    view = _open_blacklist(DataDir(tmp_path))
    assert view.printed.path.name == PRINTED_BLACKLIST_FILE != UNSCOPED_PRINTED_FILE
    assert view.printed.version == 0
    assert not view.contains_printed("0000", SZT_PRINTED)
    assert view.contains("000051800000A344C213")


# --- the host: one version chain, two lists ----------------------------------------------------


def test_host_storage_keeps_the_spaces_and_issuers_apart(tmp_path: Path) -> None:
    other = printed_key(OTHER, SZT_PRINTED)
    seven = printed_key(SZT, "7")
    storage = SqliteStorage(tmp_path / "host.db")
    try:
        v1 = storage.publish_blacklist([881146306], [])
        v2 = storage.publish_blacklist([], [], printed_add=[SZT_KEY, other])
        v3 = storage.publish_blacklist([], [], printed_remove=[other])
        assert (v1, v2, v3) == (1, 2, 3)
        assert storage.blacklist_snapshot() == (3, [881146306])
        assert storage.blacklist_snapshot(SPACE_PRINTED) == (3, [SZT_KEY])
        assert storage.blacklist_delta(1, SPACE_PRINTED) == (3, [SZT_KEY], [])
        assert storage.blacklist_delta(1) == (3, [], [])
        assert storage.blacklist_delta(2, SPACE_PRINTED) == (3, [], [other])
        # held for a second operator: the printed entries survive the wait, issuer and all
        held = storage.propose_blacklist([], [], "ops-a", printed_add=[seven])
        assert storage.decide_blacklist(held, "ops-b", approve=True) == 4
        assert storage.blacklist_snapshot(SPACE_PRINTED) == (4, [seven, SZT_KEY])
        assert storage.printed_blacklist_entries() == (4, [(SZT, "7"), (SZT, SZT_PRINTED)], [])
    finally:
        storage.close()


def test_host_keeps_unscoped_entries_but_publishes_none(tmp_path: Path) -> None:
    """A host database from before issuer scoping holds ``p:881146306`` (no issuer): the row
    is kept and listed as unscoped, never published (no issuer-scoped list can say whose it
    is, and it must not lock every issuer's 881146306), and an operator can drop it."""
    storage = SqliteStorage(tmp_path / "host.db")
    try:
        with storage._transaction() as tx:  # as the earlier host stored it
            storage._apply_blacklist(tx, ["p:881146306", "p:42"], [])
        storage.publish_blacklist([], [], printed_add=[SZT_KEY])
        assert storage.blacklist_snapshot(SPACE_PRINTED) == (2, [SZT_KEY])
        assert storage.blacklist_delta(0, SPACE_PRINTED) == (2, [SZT_KEY], [])
        assert storage.blacklist_snapshot(SPACE_SERIAL) == (2, [])
        assert storage.printed_blacklist_entries() == (
            2,
            [(SZT, SZT_PRINTED)],
            ["42", "881146306"],
        )
        held = storage.propose_blacklist([], [], "ops-a", unscoped_remove=[42])
        assert storage.decide_blacklist(held, "ops-b", approve=True) == 3
        assert storage.publish_blacklist([], [], unscoped_remove=[881146306]) == 4
        assert storage.printed_blacklist_entries() == (4, [(SZT, SZT_PRINTED)], [])
        assert storage.blacklist_delta(2, SPACE_PRINTED) == (4, [], [])
    finally:
        storage.close()


def test_the_daemon_pulls_printed_deltas_and_refuses_a_serial_list_in_their_place(
    tmp_path: Path,
) -> None:
    """The printed-number list follows the host's version chain by deltas (added, removed);
    an answer of the wrong space (an old host that ignores ``space``) or an unscoped CBLPRN03
    list (a host before issuer scoping) is refused at its first bytes, saying so, and the
    serial list, a job of its own, goes on."""
    from clearinghost.keys import HostKey
    from clearinghost.server import HostServer, SignedAnswer, create_app
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
                seven = printed_key(OTHER, "7")
                host.storage.publish_blacklist([0x42], [], printed_add=[SZT_KEY, seven])
                daemon.pull_blacklist()
                assert printed.version == 0  # a job of its own
                assert daemon.pull_printed_blacklist() is not None
                assert printed.version == 1 and printed.count == 2
                host.storage.publish_blacklist([], [], printed_remove=[seven])
                daemon.pull_blacklist()
                result = daemon.pull_printed_blacklist()
                assert result is not None and result.kind == "delta" and result.removed == 1
                assert printed.version == 2 and printed.count == 1
                view = _open_blacklist(DataDir(terminal.data_dir))
                assert view.contains_printed(SZT, SZT_PRINTED)
                assert not view.contains_printed(OTHER, "7")
                assert not view.contains_printed(OTHER, SZT_PRINTED)
                assert view.contains(f"{0x42:016X}") and view.version == 2

                serial_only = host.blacklist_answer  # what the route serves

                def old_host(since: int, space: str = SPACE_SERIAL) -> SignedAnswer:
                    return serial_only(since)  # a host that ignores ?space=

                host.blacklist_answer = old_host  # type: ignore[method-assign]
                host.storage.publish_blacklist([0x43], [])
                with pytest.raises(ProtocolError, match="a serial-number list where a printed"):
                    daemon.pull_printed_blacklist()
                assert daemon.pull_blacklist() is not None  # the serial list is not held back
                assert daemon.blacklist.version == 3 and printed.version == 2

                def unscoped_host(since: int, space: str = SPACE_SERIAL) -> SignedAnswer:
                    answer = serial_only(since, space)  # CBLPRN03: the numbers alone
                    if space != SPACE_PRINTED:
                        return answer
                    return SignedAnswer(
                        b"CBLPRN03" + answer.document[8:], answer.issued_at, answer.version
                    )

                host.blacklist_answer = unscoped_host  # type: ignore[method-assign]
                host.storage.publish_blacklist([0x44], [])
                with pytest.raises(ProtocolError, match="unscoped printed-number list"):
                    daemon.pull_printed_blacklist()
                assert daemon.pull_blacklist() is not None
                assert daemon.blacklist.version == 4 and printed.version == 2
                assert view.contains_printed(SZT, SZT_PRINTED)  # the list in force stays
            finally:
                daemon.close()
    finally:
        host.storage.close()
        terminal.store.close()


# --- end to end: operator, host, daemon, agent, card ------------------------------------------


def shenzhen_tong_card(
    keyset: KeySet, printed: str, df_name: bytes = b"PAY.SZT"
) -> SimulatedCpuCard:
    """A simulated Shenzhen Tong card (ADF 1001, DF name PAY.SZT, 32-byte EF15 as the real
    recording's) whose printed number is ``printed``: little-endian at EF15[16..19]. Another
    ``df_name`` makes the same card of another issuer's dialect (:func:`other_city_dialect`)."""
    asn = bytes.fromhex("51800000") + int(printed).to_bytes(4, "little")
    issuer = bytes.fromhex("1000000000000000")  # as tests.fake_reader.scenario.make_card
    card = make_legacy_1001_card(
        keyset=keyset,
        asn=asn,
        balance=5000,
        issuer_id=issuer,
        factors=(asn, issuer),
        df_name=df_name,
    )
    card.binaries[0x15] = card.binaries[0x15] + bytes(2)  # 30 -> 32 bytes, as PAY.SZT has
    return card


OTHER_DF_NAME = b"PAY.OTH"


def city_dialects() -> tuple[Dialect, ...]:
    """The shipped dialects, and another city's issuer whose cards number themselves as
    Shenzhen Tong's do (a test dialect: DF name PAY.OTH, issuer city 2000), so that two cards
    of two issuers carry the same printed number."""
    shipped = load_dialects(CHINA_CITIES)
    szt = next(d for d in shipped if d.name == "shenzhen-tong")
    assert szt.issuer_city == SZT
    other = replace(
        szt,
        name="other-city",
        source="test dialect: Shenzhen Tong's layout under another issuer",
        df_name=OTHER_DF_NAME,
        issuer_city=OTHER,
    )
    return (*shipped, other, *standard_dialects())


def test_operator_blacklists_a_printed_number_and_the_agent_locks_the_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cardhost blacklist --printed --issuer shenzhen-tong add 881146306`` at the real host
    (HTTP on 127.0.0.1); the daemon pulls the printed-number list; the agent's view of the data
    directory (as ``cardagent run`` opens it) finds the Shenzhen Tong card by its issuer and
    printed number and the tap locks it (APPLICATION BLOCK through the PSAM), while another
    issuer's card printed 881146306, and a Shenzhen Tong card printed otherwise, pay."""
    from clearinghost import cli as host_cli
    from clearinghost.operators import TOKEN_ENV

    monkeypatch.setattr(host_cli, "configure_logging", lambda *args: None)
    data_dir = tmp_path / "bus"
    DataDir(data_dir).provision("BUS-SZT")
    sync = start_local_sync(data_dir, blacklist_interval_s=0.3)
    try:
        monkeypatch.setenv(TOKEN_ENV, sync.operator_token)
        base = ["blacklist", "--host", sync.url, "--printed"]
        refused = [
            (["add", SZT_PRINTED], "--printed needs --issuer"),
            (["--issuer", "nowhere", "add", SZT_PRINTED], "unknown issuer 'nowhere'"),
            (["--issuer", "51800", "add", SZT_PRINTED], "not a 4-digit city code"),
            (["--issuer", "legacy1001", "add", SZT_PRINTED], "names no issuer_city"),
            (["--issuer", SZT, "add", "51800000A344C213"], "is not decimal digits"),
            (["--issuer", SZT, "add", "1" * 15], "has 15 digits, at most 14"),
            (["--issuer", SZT, "--unscoped", "remove", SZT_PRINTED], "--unscoped only"),
        ]
        for extra, message in refused:
            assert host_cli.main(base + extra) == 2, extra
            assert message in capsys.readouterr().err, extra
        assert sync.host.storage.blacklist_version() == 0  # nothing was published
        add = [*base, "--issuer", "shenzhen-tong", "add", SZT_PRINTED]
        assert host_cli.main(add) == 0
        version = sync.host.storage.blacklist_version()
        assert sync.host.storage.blacklist_snapshot(SPACE_PRINTED) == (version, [SZT_KEY])
        capsys.readouterr()
        assert host_cli.main([*base, "list"]) == 0
        listing = [line for line in capsys.readouterr().out.splitlines() if "\t" in line]
        assert listing == [f"# version {version}: issuer\tprinted number", f"{SZT}\t{SZT_PRINTED}"]
        agent_view = _open_blacklist(DataDir(data_dir))
        published = time.monotonic()
        while not agent_view.contains_printed(SZT, SZT_PRINTED):
            # a hang bound, not a speed claim (the pull interval is 0.3 s; CI is loaded)
            assert time.monotonic() - published < 60.0, "the printed number never arrived"
            time.sleep(0.05)
        assert sync.daemon.printed_blacklist is not None
        assert sync.daemon.printed_blacklist.version == version
        assert (data_dir / PRINTED_BLACKLIST_FILE).exists()
        assert "printed_blacklist_version" in sync.daemon.health()

        rig = Rig(tmp_path / "rig", dialects=city_dialects())
        try:
            rig.engine = TransactionEngine(rig.profile, rig.store, rig.sam, blacklist=agent_view)
            other_issuer = shenzhen_tong_card(rig.keyset, SZT_PRINTED, df_name=OTHER_DF_NAME)
            paid = rig.tap(other_issuer)
            assert paid.status == "paid", paid.reason
            assert paid.printed_number == SZT_PRINTED  # the same number, another issuer
            assert other_issuer.lock_state != "temporary"
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
        refused = [
            ({"printed_add": [SZT_PRINTED]}, "printed_add[0]: '881146306' names no issuer"),
            ({"printed_add": ["0x1234"]}, "printed_add[0]: '0x1234' names no issuer"),
            (
                {"printed_add": [{"issuer": "51A0", "number": SZT_PRINTED}]},
                "issuer '51A0' is not a 4-digit city code",
            ),
            (
                {"printed_remove": [{"issuer": SZT, "number": "12a"}]},
                "printed_remove[0]: printed card number '12a' is not decimal digits",
            ),
            (
                {"printed_add": [{"issuer": SZT, "number": "3105170010170907984"}]},
                "has 19 digits, at most 14",
            ),
            ({"printed_add": [{"issuer": SZT}]}, "is not {'issuer'"),
            ({"printed_remove_unscoped": ["88x"]}, "is not 1 to 19 decimal digits"),
        ]
        for body, detail in refused:
            answer = httpx.post(
                f"{sync.url}/v1/admin/blacklist", json=body, headers=headers, timeout=10
            )
            assert answer.status_code == 400, body
            assert answer.json()["error"] == "bad_printed_number", body
            assert detail in answer.json()["detail"], (body, answer.json())
        assert sync.host.storage.blacklist_version() == 0
        good = {"printed_add": [{"issuer": SZT, "number": "0881146306"}]}
        answer = httpx.post(
            f"{sync.url}/v1/admin/blacklist", json=good, headers=headers, timeout=10
        )
        assert answer.status_code == 200
        listing = httpx.get(f"{sync.url}/v1/admin/blacklist/printed", headers=headers, timeout=10)
        assert listing.json() == {
            "version": 1,
            "printed": [{"issuer": SZT, "number": SZT_PRINTED}],
            "unscoped": [],
        }
        assert httpx.get(f"{sync.url}/v1/admin/blacklist/printed", timeout=10).status_code == 401
        listing = httpx.get(f"{sync.url}/v1/blacklist", params={"space": "uid"}, timeout=10)
        assert listing.status_code == 400
        assert "space must be serial or printed" in listing.json()["detail"]
        printed = httpx.get(f"{sync.url}/v1/blacklist", params={"space": "printed"}, timeout=10)
        assert printed.status_code == 200 and printed.content.startswith(b"CBLPRN04")
        serial = httpx.get(f"{sync.url}/v1/blacklist", timeout=10)
        assert serial.status_code == 200 and serial.content.startswith(b"CBLIST03")
    finally:
        sync.stop()


def test_read_card_shows_a_listed_printed_number_at_the_pos(tmp_path: Path) -> None:
    """The POS card view (agent.pos.card_info) says a card is blacklisted by its issuer and
    number, and a card of another issuer with the same number is not."""
    from agent.pos.card_info import read_card

    rig = Rig(tmp_path / "rig", dialects=city_dialects())
    try:
        lists = _lists(tmp_path / "lists", serial=[], printed=[SZT_KEY])
        today = dt.date(2026, 1, 1)
        sams = SingleSamRouter(rig.sam)
        for df_name, status in ((b"PAY.SZT", "blacklisted"), (OTHER_DF_NAME, "ok")):
            rig.field.insert(shenzhen_tong_card(rig.keyset, SZT_PRINTED, df_name=df_name))
            presence = rig.reader.wait_for_card(0)
            assert presence is not None
            shown = read_card(rig.reader, presence, rig.profile, sams, lists, today)
            assert shown["status"] == status, shown
            assert shown["printed_number"] == SZT_PRINTED
            assert shown["issuer_code"] == (SZT if df_name == b"PAY.SZT" else OTHER)
            if status == "blacklisted":
                assert f"printed number {SZT_PRINTED} of issuer {SZT}" in shown["reason"]
            rig.field.remove()
        unlisted = _lists(tmp_path / "none", serial=[], printed=[printed_key(OTHER, "881146307")])
        rig.field.insert(shenzhen_tong_card(rig.keyset, SZT_PRINTED))
        presence = rig.reader.wait_for_card(0)
        assert presence is not None
        shown = read_card(rig.reader, presence, rig.profile, sams, unlisted, today)
        assert shown["status"] == "ok", shown
    finally:
        rig.close()
