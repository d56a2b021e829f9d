"""Load authorisation benchmark: the host's round trip against a bare MAC computation.

``python -m bench.bench_load [--requests N] [--warmup W]`` measures, side by side in one run
(variants interleaved in blocks, so drift of a shared machine hits them alike):

* **round trip**: the kiosk's real client (:class:`agent.tap.load_http.HttpLoadHost`: JSON,
  Ed25519-signed request, httpx keep-alive) → the real clearing host (uvicorn on 127.0.0.1,
  signature check, :class:`clearinghost.loads.LoadAuthority`: MAC1 check, payment, MAC2, the
  load row committed in SQLite ``synchronous=FULL``) → MAC2 back; with the software key store
  and with the PKCS#11 key store on a SoftHSM2 token (3DES on the token's mechanisms; SM4
  masters unwrapped by the token's AES key), for 3DES and SM4 cards;
* **key store only**: the same MAC1 check + MAC2 through each key store, no HTTP, no database;
* **bare MAC**: one MAC over the 15-byte MAC1 input under a precomputed session key
  (:func:`agent.crypto.session_mac`), the floor of any load authorisation.

Every request is a fresh card (its own ASN, so no earlier load of the card is open). The loads
database is on tmpfs when ``/dev/shm`` exists (the protocol and the crypto, not the disk's
fsync; the tap benchmark measures the disk). The report goes to ``bench/RESULTS-load.md``
(overwritten) and to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent import crypto
from agent.crypto import Algorithm
from agent.offline_store import DeviceKey
from agent.sam.keys import KeySet
from agent.tap.load import LoadRequest
from agent.tap.load_http import HttpLoadHost
from bench.bench_tap import percentile
from clearinghost.keys import HostKey
from clearinghost.keystore import CardKeyRef, KeyStore, SoftwareKeyStore, load_test_keys
from clearinghost.keystore_pkcs11 import Pkcs11KeyStore, reread_library_configuration
from clearinghost.loads import LOAD_TYPE, LoadAuthority
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS-load.md"
KIOSK = "KIOSK-BENCH"
TERMINAL = bytes.fromhex("000000000024")
ISSUER = bytes.fromhex("01011000FFFFFFFF")
WHEN = bytes.fromhex("20261130120000")
AMOUNT = 2000
BLOCK = 25  # samples per variant before the next variant takes its turn
SOFTHSM_LIBRARIES = (
    os.environ.get("SOFTHSM2_LIB", ""),
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "cardagent-bench"
TOKEN_PIN = "1234"  # TEST token PIN (a throw-away token in a temporary directory)


def quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


@dataclass
class Variant:
    label: str
    run: Callable[[int], None]  # one measured call for sample n
    samples: list[float] = field(default_factory=list)  # ms


def softhsm_token(root: Path, keys: KeySet) -> str:
    """A SoftHSM2 token in ``root`` holding the load and TAC masters; its library path."""
    library = next((lib for lib in SOFTHSM_LIBRARIES if lib and Path(lib).exists()), None)
    if library is None or shutil.which("softhsm2-util") is None:
        raise SystemExit("SoftHSM2 missing: apt-get install softhsm2")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
         "--pin", TOKEN_PIN, "--so-pin", "5678"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    reread_library_configuration(library)  # a library already initialised knows another token
    store = Pkcs11KeyStore(library, TOKEN_LABEL, TOKEN_PIN)
    store.create_wrapping_key()
    for master in keys:
        if master.usage in ("load", "tac"):
            store.import_master(master)
    store.close()
    return library


def card_request(reference: KeyStore, n: int, algorithm: Algorithm, prefix: str) -> dict[str, Any]:
    """The request a kiosk sends for card ``n``: MAC1 made with the reference (software) store
    (the load MAC1 and MAC2 are the same MAC under SESLK, §5.7, over different data)."""
    asn = bytes.fromhex(f"51{n:014d}")
    factors = (asn, ISSUER)
    random4 = n.to_bytes(4, "big")
    balance, counter = 100, n % 60000
    ref = CardKeyRef("load", 1, algorithm, factors)
    mac1_data = balance.to_bytes(4, "big") + AMOUNT.to_bytes(4, "big") + bytes((LOAD_TYPE,))
    mac1 = reference.load_mac2(ref, random4, counter, mac1_data + TERMINAL)
    request = LoadRequest(
        load_key=f"{prefix}-{n}",
        asn=asn.hex().upper(),
        factors=(asn.hex().upper(), ISSUER.hex().upper()),
        key_index=1,
        key_version=1,
        algorithm=int(algorithm),
        balance=balance,
        counter=counter,
        random=random4.hex().upper(),
        mac1=mac1.hex().upper(),
        amount=AMOUNT,
        terminal=TERMINAL.hex().upper(),
        datetime=WHEN.hex().upper(),
        payment={"kind": "cash", "amount": AMOUNT},
    )
    return {"request": request, "ref": ref, "random": random4, "counter": counter,
            "mac1": mac1, "mac1_data": mac1_data + TERMINAL}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000, help="measured calls per variant")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured calls per variant")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be ≥ 1 and --warmup ≥ 0")
    config_before = structlog.get_config()
    previous_conf = os.environ.get("SOFTHSM2_CONF")
    quiet()
    started = time.perf_counter()
    try:
        report = run(args.requests, args.warmup, started)
    finally:
        structlog.configure(**config_before)
        if previous_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous_conf
    args.output.write_text(report, encoding="utf-8")
    print(report, end="")
    return 0


def run(requests: int, warmup: int, started: float) -> str:
    keys = KeySet(load_test_keys())
    software = SoftwareKeyStore(keys)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="bench-load-", dir=base) as tmp:
        root = Path(tmp)
        filesystem = "tmpfs (/dev/shm)" if base else "the temporary directory's disk"
        token_root = root / "softhsm"
        token_root.mkdir()
        library = softhsm_token(token_root, keys)
        hsm = Pkcs11KeyStore(library, TOKEN_LABEL, TOKEN_PIN)
        device = DeviceKey.generate()
        stores: dict[str, KeyStore] = {"software": software, "SoftHSM2": hsm}
        hosts, servers, clients = [], [], []
        variants: list[Variant] = []
        total = requests + warmup
        try:
            for name, store in stores.items():
                authority = LoadAuthority(root / f"loads-{name}.db", store, max_balance=10**9)
                host = ClearingHost(
                    SqliteStorage(root / f"host-{name}.db"), HostKey.generate(), loads=authority
                )
                host.storage.register_terminal(KIOSK, device.public_key_bytes.hex())
                server = HostServer(create_app(host), log_level="critical")
                url = server.__enter__().url
                hosts.append(host)
                servers.append(server)
                client = HttpLoadHost(url, KIOSK, device, timeout_s=60, attempts=1)
                clients.append(client)
                for algorithm in (Algorithm.TDES, Algorithm.SM4):
                    prefix = f"{name}-{algorithm.name}"
                    offset = len(variants) * total
                    cards = [card_request(software, offset + n, algorithm, prefix)
                             for n in range(total)]  # fmt: skip
                    variants.append(round_trip(f"round trip, {name}, {algorithm.name}",
                                               client, cards))  # fmt: skip
                    variants.append(store_only(f"key store only, {name}, {algorithm.name}",
                                               store, cards))  # fmt: skip
            for algorithm in (Algorithm.TDES, Algorithm.SM4):
                variants.append(bare_mac(f"bare MAC, {algorithm.name}", algorithm))
            measure(variants, requests, warmup)
            states = {
                name: sorted({v.state for v in host.loads.loads()})
                for name, host in zip(stores, hosts, strict=True)
                if host.loads is not None
            }
        finally:
            for client in clients:
                client.close()
            for server in servers:
                server.__exit__(None, None, None)
            for host in hosts:
                assert host.loads is not None
                host.loads.close()
                host.storage.close()
            hsm.close()
    return render(variants, requests, warmup, filesystem, states, time.perf_counter() - started)


def round_trip(label: str, client: HttpLoadHost, cards: list[dict[str, Any]]) -> Variant:
    def call(n: int) -> None:
        mac2 = client.authorise(cards[n]["request"])
        assert len(mac2) == 4

    return Variant(label, call)


def store_only(label: str, store: KeyStore, cards: list[dict[str, Any]]) -> Variant:
    mac2_data = AMOUNT.to_bytes(4, "big") + bytes((LOAD_TYPE,)) + TERMINAL + WHEN

    def call(n: int) -> None:
        c = cards[n]
        assert store.load_mac1_ok(c["ref"], c["random"], c["counter"], c["mac1"], c["mac1_data"])
        store.load_mac2(c["ref"], c["random"], c["counter"], mac2_data)

    return Variant(label, call)


def bare_mac(label: str, algorithm: Algorithm) -> Variant:
    session = bytes(range(8 if algorithm == Algorithm.TDES else 16))  # TEST value
    data = bytes.fromhex("000000640000075002000000000024")  # 15 bytes, like MAC1's input

    def call(n: int) -> None:
        crypto.session_mac(session, data, algorithm)

    return Variant(label, call)


def measure(variants: list[Variant], requests: int, warmup: int) -> None:
    """Warm-up calls, then the measured calls in interleaved blocks of :data:`BLOCK`."""
    for v in variants:
        for n in range(warmup):
            v.run(n)
    done = 0
    while done < requests:
        block = min(BLOCK, requests - done)
        for v in variants:
            for n in range(warmup + done, warmup + done + block):
                t0 = time.perf_counter()
                v.run(n)
                v.samples.append((time.perf_counter() - t0) * 1000.0)
        done += block


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def render(
    variants: list[Variant],
    requests: int,
    warmup: int,
    filesystem: str,
    states: dict[str, list[str]],
    elapsed_s: float,
) -> str:
    p50 = {v.label: percentile(v.samples, 50) for v in variants}
    p99 = {v.label: percentile(v.samples, 99) for v in variants}
    lines = [
        "# Load authorisation benchmark",
        "",
        "Generated by `.venv/bin/python -m bench.bench_load` (overwritten on every run).",
        "",
        "## Machine",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- platform: {platform.platform()} ({platform.machine()})",
        f"- CPUs (os.cpu_count): {os.cpu_count()}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
        f"- calls: N = {requests} measured per variant, after {warmup} warm-up calls; variants "
        f"interleaved in blocks of {BLOCK}; loads databases on {filesystem}",
        f"- load states at the end: {states}",
        f"- whole benchmark: {elapsed_s:.1f} s",
        "",
        "## Figures per call",
        "",
        "| per call, ms | p50 | p99 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {v.label} | {_ms(p50[v.label])} | {_ms(p99[v.label])} |" for v in variants]
    lines += ["", "## Ratios", "", "| ratio (p50) | value |", "|---|---:|"]
    for store in ("software", "SoftHSM2"):
        for algorithm in ("TDES", "SM4"):
            trip, keys = (
                f"round trip, {store}, {algorithm}",
                f"key store only, {store}, {algorithm}",
            )
            bare = f"bare MAC, {algorithm}"
            lines.append(f"| {trip} / {bare} | {p50[trip] / p50[bare]:.0f} |")
            lines.append(f"| {keys} / {bare} | {p50[keys] / p50[bare]:.0f} |")
            lines.append(f"| {trip} / {keys} | {p50[trip] / p50[keys]:.1f} |")
    lines += [
        "",
        "## Reading",
        "",
        "- A round trip is what one kiosk waits for between INITIALIZE FOR LOAD and CREDIT FOR "
        "LOAD: the signed HTTP request, the host's signature check, MAC1, the payment, MAC2 "
        "and the durable load row, and the answer. The bare MAC is one MAC under a session key "
        "already derived: the floor of the cryptography alone.",
        "- Key store only = two-level diversification + session key + MAC1 check + MAC2: on the "
        "token each is a PKCS#11 call (C_DeriveKey ×3, C_Encrypt ×2 for 3DES); SM4 masters are "
        "unwrapped by the token's AES key, then computed in memory.",
        "- The round trip over the key store is HTTP, JSON, Ed25519 and the SQLite commit.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
