"""``cardhost demo --role fares``: a bus line priced by the fare policy, tap by tap, in words.

What runs: the reference clearing host (HTTP on 127.0.0.1) and the sync daemon
(:func:`clearinghost.local.start_local_sync`), the agent's real engine
(:class:`agent.transaction.TransactionEngine`, store and device key in the data directory) with
the real PSAM driver over a simulated PSAM, and simulated T-Union cards from
``tests/fake_reader`` (so the demo needs a source checkout, like ``cardhost demo``).

The fare policy is published at the host as an operator would (``POST /v1/admin/params``,
checked there by the same validator the terminals use); the daemon pulls the signed set into
``params.json``; the engine verifies and applies it. The bus's "GPS" moves the validator by
rewriting ``position.json`` (:func:`agent.position.write_position`) before each tap. The tap
times come from a simulated clock that starts now and jumps between the taps (a morning of
riding in a few seconds), so the transfer window, the double-tap window and the longest trip
are met as on a real day. Every tap's decision is printed from the signed purchase record the
agent wrote (``fare_kind``, ``fare_base``, ``fare_refund_due``, ``fare_unfinished``,
``fare_transfer_from``); the records are then uploaded to the host and counted there.

Each alighting tap that pre-authorised more than the trip cost becomes, at the host, one
pending load for that card (:mod:`clearinghost.fare_refunds`), listed as the operator sees it
(``GET /v1/admin/loads/credits``); the adult rider then takes their refunds at a kiosk (an
online load paid by the pending load: :class:`agent.tap.load.KioskLoader` over the host's load
API, the card's load key from the test key store).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from agent.errors import ConfigurationError
from agent.offline_store import DeviceKey, OfflineStore, Record
from agent.params import PARAMS_FILE, ActiveParams
from agent.position import POSITION_FILE, PositionFile, write_position
from agent.products import cpu_logs
from agent.products.cpu_logs import Trip
from agent.products.fare_policy import parse_fare_policy
from agent.profile import TUNION_EF1E, Profile, load_profile
from agent.sam.keys import KeySet
from agent.sam.psam import PsamConfig, PsamDriver
from agent.tap.load import KioskLoader
from agent.tap.load_http import HttpLoadHost
from agent.transaction import TapOutcome, TransactionEngine
from agent.wiring import DataDir
from clearinghost.keystore import SoftwareKeyStore, load_test_keys
from clearinghost.loads import LoadAuthority
from clearinghost.local import LocalSync, start_local_sync

if TYPE_CHECKING:  # the simulators are test code, imported at run time only by the demo
    from tests.fake_reader.cpu_card import SimulatedCpuCard
    from tests.fake_reader.inprocess import CardField, InProcessReader

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "firmware_profiles" / "test-city-demo.toml"
TERMINAL_ID = "DEMO-FARES-1"
KIOSK_ID = "DEMO-FARES-KIOSK"  # where the adult rider takes the refunds
KIOSK_TERMINAL_NUMBER = bytes.fromhex("000000000024")  # the kiosk's terminal number (load MACs)

# The demo city's bus fares: a section table (sections travelled, inclusive), boarding and
# alighting taps with the maximum pre-authorised, card types (EF15 card type, hex), a
# transfer yuan between lines within an hour, and the unfinished-trip rule.
FARE_POLICY: dict[str, Any] = {
    "mode": "section",
    "max_fare": 400,
    "bands": [
        {"from": 1, "to": 3, "price": 200},
        {"from": 4, "to": 6, "price": 300},
        {"from": 7, "to": 9, "price": 400},
    ],
    "lines": {
        "8": {"mode": "bus", "stops": [{"id": i, "section": i} for i in range(1, 10)]},
        "9": {"mode": "bus", "stops": [{"id": i, "section": i} for i in range(1, 7)]},
    },
    "card_types": {"04": {"percent": 50}, "05": {"free": True}},
    "transfer": {"window_s": 3600, "discount": 100, "between": "lines"},
    "entry_exit": {"boarding_debit": "max", "unfinished": "max_fare", "max_trip_s": 14400},
}
CARD_TYPES = {1: "adult", 4: "student", 5: "senior"}


@dataclass(frozen=True)
class Tap:
    minutes: int  # after the start of the morning
    card: str  # which rider
    line: int
    stop: int
    story: str  # what the rider does, for the printout


RIDERS = {"adult": (1, 1), "senior": (2, 5), "student": (3, 4), "forgetful": (4, 1)}
# (card number in the simulated stream, card type)

TAPS = (
    Tap(0, "adult", 8, 1, "boards line 8 at stop 1"),
    Tap(20, "adult", 8, 3, "alights at stop 3"),
    Tap(30, "adult", 9, 1, "boards line 9 ten minutes later (a transfer)"),
    Tap(45, "adult", 9, 6, "alights at stop 6"),
    Tap(50, "senior", 8, 2, "boards line 8 at stop 2"),
    Tap(75, "senior", 8, 9, "alights at stop 9"),
    Tap(80, "student", 8, 1, "boards line 8 at stop 1"),
    Tap(100, "student", 8, 6, "alights at stop 6"),
    Tap(110, "forgetful", 8, 4, "boards line 8 at stop 4 ... and never taps off"),
    Tap(400, "forgetful", 9, 1, "boards line 9 in the afternoon"),
    Tap(415, "forgetful", 9, 3, "alights at stop 3"),
)


def run_fares_demo(data_dir: Path, *, out: Callable[[str], None] = print) -> int:
    """The demo; returns the exit status (0: every tap paid as the policy says and every
    record verified and received by the host)."""
    if not (REPO / "tests" / "fake_reader" / "scenario.py").is_file():
        raise ConfigurationError("the fares demo needs a source checkout (tests/fake_reader)")
    # The simulators: test code, imported only here (never on the host's own path).
    from tests.fake_reader.inprocess import (
        CardField,
        InProcessReader,
        InProcessSamSlot,
    )
    from tests.fake_reader.scenario import demo_keyset, make_card, make_psam

    parse_fare_policy(FARE_POLICY)  # the demo's own table is valid before anything starts
    if data_dir.exists():
        shutil.rmtree(data_dir)
    device = DataDir(data_dir)
    device.provision(TERMINAL_ID)
    profile = load_profile(PROFILE)
    # the cards' and the PSAM's test keys, and the load keys the host's key store derives from
    keyset = KeySet([*demo_keyset(profile), *load_test_keys()])
    host_dir = data_dir / "clearing-host"
    host_dir.mkdir(parents=True)
    authority = LoadAuthority(
        host_dir / "loads.db",
        SoftwareKeyStore(keyset, apdu_order_card_first=profile.factor_order_card_first),
        max_balance=profile.max_balance,
    )
    try:
        local = start_local_sync(
            data_dir,
            profile=profile,
            params_interval_s=3600.0,
            upload_interval_s=0.5,
            loads=authority,
        )
    except BaseException:
        authority.close()
        raise
    try:
        version = _publish_policy(local)
        out(
            f"clearing host on {local.url}: fare policy published as parameter set {version}; "
            "the sync daemon pulls it into params.json"
        )
        local.daemon.pull_params()  # the daemon's params job, now rather than in an hour
        _wait_for_params(data_dir / PARAMS_FILE, version)
        _describe_policy(out)
        psam = make_psam(keyset)
        sam = PsamDriver(InProcessSamSlot(psam), PsamConfig.tunion())
        sam.open()
        store = device.open_store()
        try:
            # yesterday morning: records uploaded a day late, as an offline bus's would be
            start = (dt.datetime.now().astimezone() - dt.timedelta(days=1)).replace(
                hour=7, minute=0, second=0, microsecond=0
            )
            clock = _SimulatedClock(start)
            store.set_stamp(lambda: (clock.at, {}))  # records carry the simulated time too
            engine = TransactionEngine(
                profile, store, sam, params=ActiveParams(data_dir / PARAMS_FILE), clock=clock
            )
            engine.position = PositionFile(data_dir / POSITION_FILE, profile).current
            cards = {
                name: make_card("tunion", number, keyset, balance=5000, card_catalogue=kind)
                for name, (number, kind) in RIDERS.items()
            }
            field = CardField()
            reader = InProcessReader(field)
            ok = True
            boarded = dict.fromkeys(RIDERS, 0)  # what each card's trip record says it paid
            out("\ntaps (simulated clock; the bus's GPS rewrites position.json before each):\n")
            for tap in TAPS:
                clock.at = start + dt.timedelta(minutes=tap.minutes)
                write_position(data_dir, tap.line, tap.stop, "both")
                card = cards[tap.card]
                field.insert(card)
                presence = reader.wait_for_card(1.0)
                if presence is None:
                    raise ConfigurationError("the simulated card did not answer")
                try:
                    outcome = engine.process_tap(reader, presence)
                finally:
                    field.remove()
                    engine.presence.left()
                record = _record(store, outcome)
                ok &= outcome.status == "paid"
                written = card.record_files[TUNION_EF1E.sfi].records[0]
                trip = cpu_logs.parse_trip(TUNION_EF1E, written)
                for line in _describe(tap, clock.at, outcome, record, trip, boarded[tap.card]):
                    out(line)
                boarded[tap.card] = trip.amount if trip is not None else 0
        finally:
            store.close()
            sam.close()
        total = _wait_for_upload(local, device)
        at_host = local.records_at_host()
        with OfflineStore.open_for_reading(device.store_path) as reading:
            report = reading.verify()
            purchases = [r for r in reading.records() if r.kind == "purchase"]
        refunds = sum(int(r.fields.get("fare_refund_due") or 0) for r in purchases)
        taken = sum(r.amount for r in purchases)
        out(
            f"\n{total} records signed, chain {'verified' if report.ok else 'BROKEN'}; "
            f"the clearing host received and verified {at_host}"
        )
        out(
            f"fares taken from the cards {taken / 100:.2f}; refunds due from the host "
            f"{refunds / 100:.2f}; net {(taken - refunds) / 100:.2f}"
        )
        owed = sum(1 for r in purchases if r.fields.get("fare_refund_due"))
        pending = _wait_for_pending(local, owed)
        credited = sum(int(p["amount"]) for p in pending)
        ok &= len(pending) == owed and credited == refunds
        riders = {cards[name].asn.hex().upper(): name for name in RIDERS}
        out(f"\npending loads at the clearing host (what the operator lists), {len(pending)}:")
        for p in pending:
            rider = riders.get(str(p["asn"]), "?")
            out(f"  {p['id']}  {rider} card  {_yuan(int(p['amount']))}  ({p['reference']})")
        ok &= _kiosk_refunds(data_dir, local, profile, field, reader, cards["adult"], pending, out)
    finally:
        local.stop()
        authority.close()
    return 0 if ok and report.ok and at_host == total else 1


def _wait_for_pending(
    local: LocalSync, count: int, timeout_s: float = 20.0
) -> list[dict[str, Any]]:
    """The host's open pending loads, as an operator lists them (``GET
    /v1/admin/loads/credits``), once ``count`` are there (they are made as the upload that
    carries their records is stored) or the bound has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = httpx.get(
            f"{local.url}/v1/admin/loads/credits",
            headers={"Authorization": f"Bearer {local.operator_token}"},
            timeout=10,
        )
        answer.raise_for_status()
        found: list[dict[str, Any]] = answer.json()["pending_loads"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _kiosk_refunds(
    data_dir: Path,
    local: LocalSync,
    profile: Profile,
    field: CardField,
    reader: InProcessReader,
    card: SimulatedCpuCard,
    pending: list[dict[str, Any]],
    out: Callable[[str], None],
) -> bool:
    """The adult rider at a kiosk: each of the card's pending loads is loaded onto the card
    (an online load paid by the pending load). True if every one was loaded."""
    kiosk_dir = data_dir / "kiosk"
    kiosk_dir.mkdir()
    key = DeviceKey.create(kiosk_dir / "device.key")
    local.host.storage.register_terminal(KIOSK_ID, key.public_key_bytes.hex())
    asn = card.asn.hex().upper()
    mine = [p for p in pending if p["asn"] == asn]
    store = OfflineStore.open(kiosk_dir / "agent.db", key, KIOSK_ID)
    client = HttpLoadHost(local.url, KIOSK_ID, key)
    ok = bool(mine)
    try:
        loader = KioskLoader(profile, store, client, KIOSK_TERMINAL_NUMBER)
        out("\nthe adult rider at a kiosk: the card's pending loads are loaded onto it")
        for n, p in enumerate(mine, start=1):
            before = card.balance
            field.insert(card)
            try:
                if reader.wait_for_card(1.0) is None:
                    raise ConfigurationError("the simulated card did not answer at the kiosk")
                result = loader.load(
                    reader, int(p["amount"]), {"kind": "pending", "id": p["id"]}, f"fare-{n}"
                )
            finally:
                field.remove()
            ok &= result.status == "loaded"
            out(
                f"  {p['id']}: {result.status} {_yuan(int(p['amount']))}, balance "
                f"{_yuan(before)} -> {_yuan(card.balance)}"
                + (f" ({result.reason})" if result.reason else "")
            )
    finally:
        client.close()
        store.close()
    left = [p for p in _wait_for_pending(local, 0, 0.0) if p["asn"] == asn]
    out(f"  the adult card's open pending loads now: {len(left)}")
    return ok and not left


class _SimulatedClock:
    """The engine's clock: the time the demo says it is (aware, local zone)."""

    def __init__(self, at: dt.datetime) -> None:
        self.at = at

    def __call__(self) -> dt.datetime:
        return self.at


def _publish_policy(local: LocalSync) -> int:
    """What an operator does: ``POST /v1/admin/params`` (checked at the host)."""
    body = {"fare_policy": FARE_POLICY, "effective_from": 0}
    answer = httpx.post(
        f"{local.url}/v1/admin/params",
        json=body,
        headers={"Authorization": f"Bearer {local.operator_token}"},
        timeout=10,
    )
    if answer.status_code != 200:
        raise ConfigurationError(
            f"the clearing host refused the demo's fare policy: {answer.status_code} "
            f"{answer.text[:200]}"
        )
    return int(answer.json()["version"])


def _wait_for_params(path: Path, version: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                payload = json.loads(path.read_bytes()).get("payload", {})
            except (OSError, ValueError):
                payload = {}
            if payload.get("version", 0) >= version and "fare_policy" in payload:
                return
        time.sleep(0.05)
    raise ConfigurationError(f"the sync daemon did not deliver parameter set {version} in time")


def _wait_for_upload(local: LocalSync, device: DataDir, timeout_s: float = 20.0) -> int:
    with OfflineStore.open_for_reading(device.store_path) as store:
        total = store.count_records()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and local.records_at_host() < total:
        time.sleep(0.1)
    return total


def _record(store: OfflineStore, outcome: TapOutcome) -> Record | None:
    if outcome.record_seq is None:
        return None
    return next((r for r in store.records() if r.seq == outcome.record_seq), None)


def _describe_policy(out: Callable[[str], None]) -> None:
    bands = ", ".join(
        f"{b['from']}-{b['to']} sections {b['price'] / 100:.2f}" for b in FARE_POLICY["bands"]
    )
    out(
        f"fares: {bands} (a section per stop); line 8 has 9 stops, line 9 has 6; boarding "
        "takes the dearest ride from that stop, alighting settles the trip (an overpayment "
        "is refunded by the host); students pay half, seniors ride free; 1.00 off a trip "
        "boarded within an hour of leaving another line; a trip never tapped off costs "
        "the maximum fare (4.00), charged at the card's next boarding"
    )


def _yuan(fen: int) -> str:
    return f"{fen / 100:.2f}"


CARD_WORDS = {1: "", 4: "students pay half", 5: "seniors ride free"}


def _describe(
    tap: Tap,
    when: dt.datetime,
    outcome: TapOutcome,
    record: Record | None,
    trip: Trip | None,
    boarded: int,
) -> list[str]:
    """Two lines for a tap: who did what where, and the fare decision in words (from the
    signed record, and the trip record the tap wrote to the card: ``trip``; ``boarded``: what
    the card's open trip recorded as paid before this tap)."""
    card_type = RIDERS[tap.card][1]
    rider = f"{tap.card} card ({CARD_TYPES[card_type]}, type {card_type:02d})"
    head = f"{when:%H:%M}  line {tap.line} stop {tap.stop}  {rider} {tap.story}"
    if outcome.status != "paid" or record is None:
        return [head, f"        -> {outcome.status}: {outcome.reason}"]
    f = record.fields
    kind, base = str(f.get("fare_kind")), int(f.get("fare_base") or 0)
    amount = outcome.fare
    discount = f" ({CARD_WORDS[card_type]})" if CARD_WORDS[card_type] else ""
    if kind == "entry":
        words = (
            f"boarding: the dearest ride from this stop is {_yuan(base)}{discount}: "
            f"{_yuan(amount)} pre-authorised"
        )
    elif kind == "exit":
        refund = int(f.get("fare_refund_due") or 0)
        price = boarded + amount - refund
        transfer = f.get("fare_transfer_from")
        words = f"alighting: this trip's table price is {_yuan(base)}{discount}"
        if transfer is not None:
            words += f", less 1.00 for the transfer from line {transfer}"
        words += (
            f"; the trip costs this card {_yuan(price)}, {_yuan(boarded)} was taken at boarding"
        )
        if refund:
            words += f": {_yuan(refund)} to be refunded by the clearing host"
        elif amount:
            words += f": {_yuan(amount)} more taken now"
        else:
            words += ": nothing more to pay"
    elif kind == "unfinished_then_entry":
        this_trip = trip.amount if trip is not None else amount
        words = (
            f"the card's last trip was never tapped off: closed at the maximum fare "
            f"({f.get('fare_unfinished')} rule, {_yuan(amount - this_trip)} more than its "
            f"boarding took), plus {_yuan(this_trip)} pre-authorised for this boarding"
        )
    else:
        words = f"{kind}: {_yuan(amount)}"
    balance = _yuan(outcome.balance_after or 0)
    return [head, f"        -> paid {_yuan(amount)}. {words}. Balance {balance}"]
