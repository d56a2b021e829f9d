"""The sync daemon against the real host: the store's sync cursor and compaction, TACs of real
simulated taps, mutual TLS, the scheduler's triggers, a real host restart, blacklist faults
(rollback, forged, corrupted or truncated in transit, a corrupt local file), and ``cardsync run``
as a process killed with SIGKILL between send and ack, then stopped with SIGTERM."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from agent.blacklist import BLACKLIST_FILE, Blacklist
from agent.errors import StoreError
from agent.offline_store import RecordBody
from agent.offline_store.records import FieldValue
from agent.products.fare_policy import month_start, parse_fare_policy
from agent.sam.keys import KeySet
from agent.wiring import TERMINAL_FILE
from clearinghost.clearing import DEMO_FACTOR2, TacVerifier
from clearinghost.keys import HostKey
from clearinghost.server import HostServer, ServerTls, create_app
from clearinghost.storage import SqliteStorage
from sync.client import ClientTls
from sync.daemon import FLUSH_FLAG_FILE
from sync.errors import HostUnreachable, ListRejected
from sync.params import PARAMS_FILE
from tests.fake_reader.scenario import Family, make_card
from tests.rig import TERMINAL_ID, Rig
from tests.test_sync_support import Terminal, daemon_for, fast_settings, make_host

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def host_key() -> HostKey:
    return HostKey.generate()  # TEST KEY, generated per test


# --- the store's sync additions ----------------------------------------------------------------


def test_ack_cursor_and_compaction_keep_the_chain_verifiable(tmp_path: Path) -> None:
    terminal = Terminal.provision(tmp_path, "T-STORE")
    store = terminal.store
    for _ in range(10):
        terminal.tap()
    assert (store.acknowledged_seq(), store.count_unsent()) == (0, 10)
    assert [r.seq for r in store.unsent_records(4)] == [1, 2, 3, 4]
    assert [r.seq for r in store.unsent_records(3, after_seq=8)] == [9, 10]
    assert store.oldest_unsent_created_at() is not None
    assert store.mark_acknowledged(6) == 6
    assert store.mark_acknowledged(3) == 6  # never moves back
    with pytest.raises(StoreError, match="beyond the last record"):
        store.mark_acknowledged(11)
    assert store.count_unsent() == 4 and store.unsent_records(10)[0].seq == 7
    assert store.compact(9) == 6  # only what was acknowledged
    assert [r.seq for r in store.records()] == [7, 8, 9, 10]
    assert store.verify().ok
    store.mark_acknowledged(10)
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    assert store.compact(10, created_before=past) == 6  # everything is too recent
    assert store.compact(10, created_before=future) == 10
    assert store.count_records() == 0 and store.verify().ok
    terminal.tap()
    assert store.verify().ok and store.count_unsent() == 1
    assert store.file_size() > 0
    store.close()


# --- TACs of real taps --------------------------------------------------------------------------


def test_host_recomputes_tacs_of_real_taps(tmp_path: Path, host_key: HostKey) -> None:
    rig = Rig(tmp_path / "rig")
    (rig.directory / TERMINAL_FILE).write_text(json.dumps({"terminal_id": TERMINAL_ID}))
    families: tuple[Family, ...] = ("tunion", "cjt166", "legacy1001", "tunion")
    for number, family in enumerate(families):
        assert rig.tap(make_card(family, number + 1, rig.keyset)).status == "paid"
    purchase = rig.records(kind="purchase")[0]
    # a record whose TAC was altered before sealing (a terminal-side forgery)
    fields = dict(purchase.fields, tac="00000000")
    rig.store.append_record(RecordBody("purchase", purchase.card_id, purchase.amount, fields))
    rig.store.append_record(
        RecordBody("unresolved", purchase.card_id, 200, {"product": "cpu", "reason": "test"})
    )
    tac = TacVerifier(KeySet.from_mapping(rig.profile.test_keys), DEMO_FACTOR2)
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key, tac=tac)
    with HostServer(create_app(host)) as server:
        daemon = daemon_for(
            Terminal(TERMINAL_ID, rig.directory, rig.store), fast_settings(server.url, host_key)
        )
        daemon.upload_pending()
        daemon.close()
    anomalies = {(a["seq"], a["kind"]) for a in host.storage.anomalies()}
    assert anomalies == {(5, "bad_tac"), (6, "unresolved")}
    host.storage.close()
    rig.abandoned.clear()


# --- mutual TLS ---------------------------------------------------------------------------------


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A throw-away test CA, a server certificate for 127.0.0.1 and a client certificate."""
    directory = tmp_path / "pki"
    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("cardsync test CA", ca_key, None, ca_key, ca=True)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert, server_key_path = _write(
        directory, "server", _cert("127.0.0.1", server_key, ca, ca_key, server=True), server_key
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert, client_key_path = _write(
        directory, "client", _cert("BUS-TLS", client_key, ca, ca_key), client_key
    )
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _cert("rogue CA", rogue_key, None, rogue_key, ca=True)
    rogue_cert, rogue_key_path = _write(
        directory, "rogue", _cert("BUS-TLS", rogue_key, rogue_ca, rogue_key), rogue_key
    )
    return {
        "ca": ca_path,
        "server_cert": server_cert,
        "server_key": server_key_path,
        "client_cert": client_cert,
        "client_key": client_key_path,
        "rogue_cert": rogue_cert,
        "rogue_key": rogue_key_path,
    }


def test_mutual_tls(tmp_path: Path, host_key: HostKey, pki: dict[str, Path]) -> None:
    terminal = Terminal.provision(tmp_path, "BUS-TLS")
    for _ in range(7):
        terminal.tap()
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key)
    tls = ServerTls(pki["server_cert"], pki["server_key"], client_ca_file=pki["ca"])
    with HostServer(create_app(host), tls=tls) as server:
        assert server.url.startswith("https://127.0.0.1:")
        good = ClientTls(pki["ca"], pki["client_cert"], pki["client_key"])
        for wrong in (
            ClientTls(pki["ca"]),  # no client certificate
            ClientTls(pki["ca"], pki["rogue_cert"], pki["rogue_key"]),  # not from the host's CA
            ClientTls(None, pki["client_cert"], pki["client_key"]),  # host not trusted
        ):
            daemon = daemon_for(terminal, fast_settings(server.url, host_key, tls=wrong, retries=0))
            with pytest.raises(HostUnreachable):
                daemon.upload_pending()
            daemon.close()
        assert host.storage.count_records() == 0
        daemon = daemon_for(terminal, fast_settings(server.url, host_key, tls=good))
        assert daemon.upload_pending().records == 7
        assert daemon.pull_blacklist() is not None
        daemon.close()
    assert dict(host.storage.record_keys("BUS-TLS")) == terminal.written
    host.storage.close()
    terminal.store.close()


# --- the scheduler ------------------------------------------------------------------------------


def wait_until(predicate, timeout: float = 60.0, what: str = "") -> None:  # a hang bound
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_scheduler_threshold_flush_and_heartbeat(tmp_path: Path, host_key: HostKey) -> None:
    terminal = Terminal.provision(tmp_path, "BUS-SCHED")
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key)
    with HostServer(create_app(host)) as server:
        settings = fast_settings(
            server.url, host_key, upload_threshold=5, upload_interval_s=3600, compact_after_s=None
        )
        daemon = daemon_for(terminal, settings)
        daemon.start()
        try:
            wait_until(lambda: host.storage.terminal("BUS-SCHED") is not None, what="heartbeat")
            for _ in range(3):
                terminal.tap()
            time.sleep(0.3)
            assert host.storage.count_records("BUS-SCHED") == 0  # below the threshold
            (terminal.data_dir / FLUSH_FLAG_FILE).touch()
            wait_until(lambda: host.storage.count_records("BUS-SCHED") == 3, what="flush")
            # The daemon clears the flag once the host's acknowledgement is in, just after the
            # host stored the batch.
            flag = terminal.data_dir / FLUSH_FLAG_FILE
            wait_until(lambda: not flag.exists(), what="flush flag cleared")
            for _ in range(5):
                terminal.tap()
            wait_until(lambda: host.storage.count_records("BUS-SCHED") == 8, what="threshold")

            def beat() -> dict[str, Any]:
                seen = host.storage.terminal("BUS-SCHED")
                return (seen.heartbeat if seen else None) or {}

            wait_until(lambda: beat().get("unsent_records") == 0, what="heartbeat figures")
            figures = beat()
            assert {"blacklist_version", "store_bytes", "oldest_unsent_age_s"} <= set(figures)
        finally:
            daemon.stop()
            daemon.close()
    host.storage.close()
    terminal.store.close()


def test_real_host_restart(tmp_path: Path, host_key: HostKey) -> None:
    terminal = Terminal.provision(tmp_path, "BUS-RESTART")
    db = tmp_path / "host.db"
    first = HostServer(create_app(make_host(SqliteStorage(db), host_key))).start()
    port = first.port
    daemon = daemon_for(terminal, fast_settings(first.url, host_key, retries=1))
    for _ in range(4):
        terminal.tap()
    daemon.upload_pending()
    first.stop()
    terminal.tap()
    with pytest.raises(HostUnreachable):
        daemon.upload_pending()  # host down: logged, retried, then left for the next run
    host = make_host(SqliteStorage(db), host_key)
    with HostServer(create_app(host), port=port):
        for _ in range(2):
            terminal.tap()
        assert daemon.upload_pending().records == 3
    assert dict(host.storage.record_keys("BUS-RESTART")) == terminal.written
    daemon.close()
    host.storage.close()
    terminal.store.close()


# --- blacklist faults ---------------------------------------------------------------------------


class Tamper:
    """ASGI layer that corrupts or truncates blacklist answers on demand."""

    def __init__(self, app) -> None:
        self.app, self.mode = app, "none"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/blacklist" or self.mode == "none":
            await self.app(scope, receive, send)
            return
        mode = self.mode

        async def altered(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(
                    message, headers=[h for h in message["headers"] if h[0] != b"content-length"]
                )
            elif message["type"] == "http.response.body" and message.get("body"):
                body = bytearray(message["body"])
                if mode == "flip":
                    body[60] ^= 0x01
                else:
                    del body[len(body) // 2 :]
                message = dict(message, body=bytes(body))
            await send(message)

        scope = dict(scope, headers=[h for h in scope["headers"] if h[0] != b"accept-encoding"])
        await self.app(scope, receive, altered)


def test_blacklist_faults_are_refused(tmp_path: Path, host_key: HostKey) -> None:
    terminal = Terminal.provision(tmp_path, "BUS-BL")
    db = tmp_path / "host.db"
    host = make_host(SqliteStorage(db), host_key)
    tamper = Tamper(create_app(host))
    with HostServer(tamper) as server:
        daemon = daemon_for(terminal, fast_settings(server.url, host_key))
        asn = 0x5170070100000077
        for n in range(3):
            host.storage.publish_blacklist([asn + n], [])
        assert daemon.pull_blacklist().version == 3  # type: ignore[union-attr]
        host.storage.publish_blacklist([asn + 10], [])
        for mode in ("flip", "truncate"):
            tamper.mode = mode
            with pytest.raises(ListRejected):
                daemon.pull_blacklist()
            assert daemon.blacklist.version == 3
        tamper.mode = "none"
        # rollback: the host is restored from an old backup holding version 1
        host.storage.close()
        db.unlink()
        host.storage = SqliteStorage(db)
        host.storage.publish_blacklist([asn], [])
        with pytest.raises(ListRejected, match="rollback"):
            daemon.pull_blacklist()
        # forged: an impostor host signing with another key
        host.key = HostKey.generate()
        for _ in range(5):
            host.storage.publish_blacklist([asn + 99], [])
        with pytest.raises(ListRejected, match="not a signing key in force"):
            daemon.pull_blacklist()
        agent_view = Blacklist.open(terminal.data_dir / BLACKLIST_FILE)
        assert agent_view.version == 3 and agent_view.contains_asn(asn + 2)
        assert not agent_view.contains_asn(asn + 99)
        daemon.close()
    # a corrupt local file: the daemon starts empty and a fresh snapshot replaces it
    path = terminal.data_dir / BLACKLIST_FILE
    path.write_bytes(path.read_bytes()[:-2])
    host.key = host_key
    with HostServer(create_app(host)) as server:
        daemon = daemon_for(terminal, fast_settings(server.url, host_key))
        assert daemon.blacklist.version == 0
        result = daemon.pull_blacklist()
        assert result is not None and result.kind == "snapshot" and result.version == 6
        daemon.close()
    assert Blacklist.open(path).contains_asn(asn + 99)
    host.storage.close()
    terminal.store.close()


# --- parameter sets: the set in force, pulled again ---------------------------------------------


def test_pulling_the_params_in_force_again_is_quiet_an_older_version_is_refused(
    tmp_path: Path, host_key: HostKey
) -> None:
    """Issue 13: with a short pull interval the daemon logged "params: version N replayed" as an
    error each time the host answered the set it already held within the same second (the host
    signs with ``issued_at`` = its clock, whole seconds). The host's clock is held still here,
    so every pull answers the same envelope; then it moves on (a renewal, written), and then
    a host restored from an old backup serves an older version (refused, loudly)."""
    terminal = Terminal.provision(tmp_path, "T-PARAMS")
    clock = [float(int(time.time()))]
    storage = SqliteStorage(tmp_path / "host.db")
    host = make_host(storage, host_key, clock=lambda: clock[0])
    storage.publish_params({"fare_table": {"flat_fare": 200}})
    storage.publish_params({"fare_table": {"flat_fare": 250}})
    with HostServer(create_app(host)) as server:
        daemon = daemon_for(terminal, fast_settings(server.url, host_key))
        params_file = terminal.data_dir / PARAMS_FILE
        first = daemon._job("params", daemon.pull_params)
        assert first is not None and first.version == 2
        written = params_file.read_bytes()
        with capture_logs() as logs:
            for _ in range(3):  # what a short params_interval_s does within one host second
                again = daemon._job("params", daemon.pull_params)
                assert again is not None and again.version == 2
        assert not [e for e in logs if e["log_level"] in ("warning", "error")], logs
        assert any(e["event"] == "params unchanged" and e["version"] == 2 for e in logs), logs
        assert daemon._jobs["params"].failures == 0
        assert params_file.read_bytes() == written  # nothing rewritten
        clock[0] += 60  # the host signs the same set later: a renewal (a later expiry), kept
        renewed = daemon._job("params", daemon.pull_params)
        assert renewed is not None and renewed.issued_at == first.issued_at + 60
        assert json.loads(params_file.read_bytes())["payload"]["issued_at"] == renewed.issued_at
        daemon.close()
    storage.close()

    # A host restored from a backup that knows only version 1: a genuine rollback, refused.
    old_storage = SqliteStorage(tmp_path / "old-host.db")
    old_host = make_host(old_storage, host_key, clock=lambda: clock[0] + 60)
    old_storage.publish_params({"fare_table": {"flat_fare": 200}})
    with HostServer(create_app(old_host)) as server:
        daemon = daemon_for(terminal, fast_settings(server.url, host_key))
        with pytest.raises(ListRejected, match="older than the loaded version 2"):
            daemon.pull_params()
        with capture_logs() as logs:
            assert daemon._job("params", daemon.pull_params) is None
        assert any(
            e["log_level"] == "error" and e["event"] == "parameter set refused" for e in logs
        ), logs
        assert daemon._jobs["params"].failures == 1
        assert daemon.params.version == 2
        daemon.close()
    old_storage.close()
    terminal.store.close()


def _stamped(at: dt.datetime) -> tuple[dt.datetime, dict[str, FieldValue]]:
    return at, {}


def test_compaction_keeps_the_records_a_monthly_cap_counts(
    tmp_path: Path, host_key: HostKey
) -> None:
    """The monthly cap's accumulator is the terminal's own records of the month
    (agent.products.fare_policy): while such a policy is in force the daemon compacts only what
    is older than the month's start in the city's time zone, whatever ``compact_after_s``."""
    terminal = Terminal.provision(tmp_path, "T-CAP")
    storage = SqliteStorage(tmp_path / "host.db")
    host = make_host(storage, host_key)
    policy = {"mode": "flat", "flat_fare": 200, "max_fare": 200, "monthly_cap": 5000}
    storage.publish_params({"fare_policy": policy, "effective_from": 0})
    now = dt.datetime.now(dt.UTC)
    begun = month_start(parse_fare_policy(policy), now)
    stamps = [now - dt.timedelta(days=40), begun - dt.timedelta(seconds=1), begun, now]
    for at in stamps:
        terminal.store.set_stamp(partial(_stamped, at))
        terminal.tap()
    with HostServer(create_app(host)) as server:
        daemon = daemon_for(terminal, fast_settings(server.url, host_key, compact_after_s=0.0))
        assert daemon.pull_params() is not None
        daemon.upload_pending()
        assert terminal.store.acknowledged_seq() == 4
        assert [r.seq for r in terminal.store.records()] == [3, 4]  # this month's, kept
        # a set without the cap: the same setting compacts every acknowledged record
        uncapped = {k: v for k, v in policy.items() if k != "monthly_cap"}
        storage.publish_params({"fare_policy": uncapped, "effective_from": 0})
        assert daemon.pull_params() is not None
        terminal.tap()
        daemon.upload_pending()
        assert terminal.store.acknowledged_seq() == 5 and terminal.store.count_records() == 0
        daemon.close()
    storage.close()
    terminal.store.close()


# --- cardsync run as a process ------------------------------------------------------------------


def _run_daemon(data_dir: Path, url: str, key: HostKey) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sync.cli",
            "--log-format",
            "json",
            "run",
            "--data-dir",
            str(data_dir),
            "--host",
            url,
            "--host-public-key",
            key.public_key_hex(),
            "--upload-interval",
            "0.05",
            "--upload-threshold",
            "1",
            "--batch-size",
            "3",
            "--check-interval",
            "0.02",
            "--compact-after",
            "0",
            "--timeout",
            "2",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def test_kill_9_between_send_and_ack_then_sigterm(
    tmp_path: Path, host_key: HostKey, procs: list[subprocess.Popen[bytes]]
) -> None:
    terminal = Terminal.provision(tmp_path, "BUS-KILL")
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key)
    with HostServer(create_app(host)) as server:
        for round_ in range(4):
            for _ in range(12):
                terminal.tap()
            proc = _run_daemon(terminal.data_dir, server.url, host_key)
            procs.append(proc)
            # kill -9 as soon as the host has seen part of this round: mid-stream, often between
            # a batch's commit at the host and the daemon's ack commit
            target = len(terminal.written) - 6
            wait_until(lambda t=target: host.storage.count_records("BUS-KILL") >= t, what="upload")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL, round_
        terminal.tap()  # uploaded by the last daemon: its signal handlers are in place
        proc = _run_daemon(terminal.data_dir, server.url, host_key)
        procs.append(proc)
        wait_until(lambda: terminal.store.count_unsent() == 0, what="final upload")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stderr is not None
        assert b"signal received; shutting down" in proc.stderr.read()
    held = host.storage.record_keys("BUS-KILL")
    assert dict(held) == terminal.written and len(held) == len(terminal.written) == 49
    assert terminal.anchor_seq() <= host.storage.terminal("BUS-KILL").ack_seq  # type: ignore[union-attr]
    assert terminal.store.verify().ok
    host.storage.close()
    terminal.store.close()


def test_cli_host_key_status_and_blacklist(
    tmp_path: Path, host_key: HostKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clearinghost import cli as host_cli
    from clearinghost.operators import TOKEN_ENV, Operators, new_token
    from sync import cli
    from sync.cli import main

    # main() configures structlog for the process; keep the test run's configuration
    monkeypatch.setattr(cli, "configure_logging", lambda *args: None)
    monkeypatch.setattr(host_cli, "configure_logging", lambda *args: None)

    key_path = tmp_path / "test-host.key"
    assert host_cli.main(["host-key", "--key", str(key_path)]) == 0
    assert HostKey.load(key_path).public_key_hex()
    terminal = Terminal.provision(tmp_path, "BUS-CLI")
    terminal.tap()
    assert main(["status", "--data-dir", str(terminal.data_dir)]) == 0
    assert main(["flush", "--data-dir", str(terminal.data_dir)]) == 0
    assert (terminal.data_dir / FLUSH_FLAG_FILE).exists()
    token = new_token()
    operators = Operators.with_token("ops", "operator", token)
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key, operators=operators)
    with HostServer(create_app(host)) as server:
        add = ["blacklist", "--host", server.url, "add", "03105170070100000005"]
        assert host_cli.main(add) == 2  # no operator token: refused before anything is sent
        monkeypatch.setenv(TOKEN_ENV, token)
        assert host_cli.main(add) == 0
        assert host.storage.blacklist_snapshot() == (1, [0x5170070100000005])
        assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    host.storage.close()
    terminal.store.close()
