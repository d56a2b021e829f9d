"""Per-APDU overhead of each reader driver against a bare call of the same library, same run.

* pyscard: ``PcscCardReader.transmit`` (worker thread + bounded wait + error translation) vs
  ``connection.transmit`` of pyscard's own ``CardConnection``, both through pcscd + vpcd to the
  same virtual card (``tests.stacks.PcscStack``; needs pcscd and vsmartcard-vpcd, run as root
  for the private namespaces).
* nfcpy: ``NfcReader.transmit`` (ISO-DEP I-block, block numbers, WTX loop) vs a bare
  ``clf.exchange`` of a pre-built I-block, over nfcpy's ``udp:`` frontend to the emulated card.
* pyserial: ``SerialModuleReader.transmit`` (framing, seq, resynchronising decoder, checks) vs a
  bare ``write`` of a pre-encoded frame + ``read`` of the known answer length, over
  ``socket://`` to the emulated module.

The card at the other end echoes the APDU, so the figures are the stacks' own costs. Rounds
alternate bare and driver calls to share the machine's noise. Run:
``.venv/bin/python -m bench.bench_readers [--apdus N] [--rounds R] [--output FILE]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nfc
import nfc.clf
import serial
import structlog
from smartcard.System import readers

from agent.readers import serial_module as sm
from agent.readers.nfc import NfcReader
from agent.readers.pcsc import PcscCardReader
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.nfc_card import NfcCardEmulator
from tests.fake_reader.vpcd_card import ContactlessCardIcc
from tests.stacks import CARD_READER, PcscStack

APDU = bytes.fromhex("00B0950000")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS-readers.md"


class EchoCard:
    uid = bytes.fromhex("A1B2C3D4")
    ats = bytes.fromhex("0578807002")

    def power_on(self) -> None:
        pass

    def process(self, apdu: bytes) -> bytes:
        return apdu + b"\x90\x00"


@dataclass
class Result:
    driver: str
    bare: str
    bare_us: list[float]
    driver_us: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.driver_us) / statistics.median(self.bare_us)


def _per_call_us(fn: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def _alternate(
    bare: Callable[[], object], driver: Callable[[], object], n: int, rounds: int
) -> tuple[list[float], list[float]]:
    for fn in (bare, driver):  # warm-up
        _per_call_us(fn, max(10, n // 10))
    bare_us, driver_us = [], []
    for _ in range(rounds):
        bare_us.append(_per_call_us(bare, n))
        driver_us.append(_per_call_us(driver, n))
    return bare_us, driver_us


def bench_serial(n: int, rounds: int) -> Result:
    field = CardField()
    emulator = ModuleEmulator(field, {}, torn_exc=CardTorn)
    _thread, port = emulator.serve_tcp("127.0.0.1", 0)
    field.insert(EchoCard())
    url = f"socket://127.0.0.1:{port}"
    reader = sm.SerialModuleReader(sm.SerialModuleLink(url, timeout=2.0))
    reader.transmit(APDU)  # the driver's port is open; the bare one replaces it below
    request = sm.encode_request(sm.CARD_APDU, 1, APDU)
    answer_len = len(sm.encode_response(sm.CARD_APDU, 1, 0, APDU + b"\x90\x00"))
    bare_port = serial.serial_for_url(url, timeout=2.0)

    def bare() -> bytes:
        bare_port.write(request)
        return bytes(bare_port.read(answer_len))

    def driver() -> bytes:
        return reader.transmit(APDU)

    try:
        # One TCP client at a time: each side reconnects when it finds its socket replaced.
        bare_us, driver_us = [], []
        for _ in range(rounds):
            bare_port.close()
            bare_port.open()
            bare_us.append(_per_call_us(bare, n))
            reader.link._drop_port()
            driver()
            driver_us.append(_per_call_us(driver, n))
    finally:
        bare_port.close()
        reader.close()
        emulator.stop()
    return Result("serial module (pyserial socket://)", "pyserial write + read", bare_us, driver_us)


def bench_nfc(n: int, rounds: int) -> Result:
    emulator = NfcCardEmulator()
    emulator.insert(EchoCard())
    block = [0]

    def open_bare() -> object:
        clf = nfc.ContactlessFrontend(emulator.path)
        assert clf.sense(nfc.clf.RemoteTarget("106A"), iterations=5, interval=0.05)
        clf.exchange(bytearray(b"\xe0\x80"), 1.0)  # RATS
        block[0] = 0
        return clf

    def driver_round() -> float:
        reader = NfcReader(emulator.path, timeout=2.0)
        try:
            assert reader.wait_for_card(5.0) is not None
            _per_call_us(lambda: reader.transmit(APDU), max(10, n // 10))
            return _per_call_us(lambda: reader.transmit(APDU), n)
        finally:
            reader.close()

    bare_us, driver_us = [], []
    try:
        for _ in range(rounds):
            clf = open_bare()

            def bare(clf: object = clf) -> bytes:
                frame = bytearray((0x02 | block[0],)) + APDU
                block[0] ^= 1
                return bytes(clf.exchange(frame, 1.0))  # type: ignore[attr-defined]

            _per_call_us(bare, max(10, n // 10))
            bare_us.append(_per_call_us(bare, n))
            clf.close()  # type: ignore[attr-defined]
            driver_us.append(driver_round())
    finally:
        emulator.close()
    return Result("nfcpy (udp frontend)", "clf.exchange of an I-block", bare_us, driver_us)


def bench_pcsc(n: int, rounds: int) -> Result:
    with tempfile.TemporaryDirectory(prefix="bench-pcscd-") as tmp:
        stack = PcscStack(Path(tmp))
        try:
            stack.start_pcscd()
            stack.slot(0).insert(ContactlessCardIcc(EchoCard()))
            stack.wait_card(CARD_READER, present=True)
            reader = PcscCardReader(CARD_READER, timeout=2.0)
            assert reader.wait_for_card(5.0) is not None
            target = next(r for r in readers() if str(r) == CARD_READER)
            connection = target.createConnection()
            connection.connect()
            apdu = list(APDU)
            bare_us, driver_us = _alternate(
                lambda: connection.transmit(apdu), lambda: reader.transmit(APDU), n, rounds
            )
            connection.disconnect()
            reader.close()
        finally:
            stack.close()
    return Result("pyscard (pcscd + vpcd)", "CardConnection.transmit", bare_us, driver_us)


def report(results: list[Result], n: int, rounds: int) -> str:
    lines = [
        "# Reader driver benchmark: per-APDU overhead against the bare library",
        "",
        "## Machine",
        "",
        f"- {platform.platform()}, Python {platform.python_version()}, {platform.machine()}",
        f"- {n} APDUs per round, {rounds} rounds; figures are medians of the per-round means",
        f"- APDU `{APDU.hex().upper()}` to an echo card; answer = APDU + 9000",
        "",
        "## Figures per APDU",
        "",
        "| driver | bare call | bare µs | driver µs | overhead µs | driver / bare |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        bare, drv = statistics.median(r.bare_us), statistics.median(r.driver_us)
        lines.append(
            f"| {r.driver} | {r.bare} | {bare:.1f} | {drv:.1f} | {drv - bare:.1f} | {r.ratio:.2f} |"
        )
    lines += [
        "",
        "## Reading",
        "",
        "- pyscard: the driver runs every PC/SC call on a worker thread that owns the context and "
        "waits for it with a timeout (a silent card or a wedged pcscd must not hang the agent); "
        "the overhead is that thread hand-off plus error translation.",
        "- nfcpy: the driver adds the ISO-DEP block bookkeeping and WTX check to one "
        "`clf.exchange`.",
        "- pyserial: the driver adds framing, sequence numbers, the resynchronising decoder and "
        "status checks; the bare call writes a pre-encoded frame and reads a known length.",
        "- Per-round means (µs), bare / driver:",
    ]
    for r in results:
        pairs = ", ".join(f"{b:.0f}/{d:.0f}" for b, d in zip(r.bare_us, r.driver_us, strict=True))
        lines.append(f"  - {r.driver}: {pairs}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--apdus", type=int, default=2000, help="APDUs per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--only", choices=("serial", "nfcpy", "pcsc"), action="append")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    benches = {"serial": bench_serial, "nfcpy": bench_nfc, "pcsc": bench_pcsc}
    results = [benches[name](args.apdus, args.rounds) for name in args.only or benches]
    text = report(results, args.apdus, args.rounds)
    args.output.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
