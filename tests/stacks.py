"""Real reader stacks for the tests: pcscd + vpcd, each test session in its own namespaces.

pcscd runs in the foreground with a private ``reader.conf.d`` that holds only vpcd
(m1-purse-and-readers.md §5.3). When ``unshare`` works (root, no seccomp in the way) pcscd runs in
private mount and network namespaces: its ``/run`` is a directory of the test session (so several
sessions never share ``/run/pcscd/pcscd.comm``) and vpcd's 0.0.0.0 listeners are invisible outside.
The test process reaches pcscd through ``PCSCLITE_CSOCK_NAME`` (§5.4 pitfall 1: honoured by the
client library) and the virtual ICCs connect from inside the namespace (:mod:`tests.fake_reader.
vpcd_card`). Without ``unshare`` pcscd falls back to the shared ``/run/pcscd``.

Every process is stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.fake_reader.vpcd_card import VpcdSlot

VPCD_LIB = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
CARD_READER = "Virtual PCD 00 00"
SAM_READER = "Virtual PCD 00 01"
# A second vpcd instance (its own friendly name, so "Virtual PCD *" patterns never reach it) gives
# a second PSAM slot: vpcd slot 2 (slot 3 exists too, unused).
SAM2_READER = "Virtual SAM 00 00"
READER_NAMES = (CARD_READER, SAM_READER, SAM2_READER, "Virtual SAM 00 01")
VPCD_SLOTS = len(READER_NAMES)

# Runs inside the new namespaces: /run becomes the session's directory, loopback comes up, then it
# holds the namespaces open until its stdin closes.
_HOLDER = r"""
import fcntl, socket, struct, subprocess, sys
subprocess.run(["mount", "--bind", sys.argv[1], "/run"], check=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", 0x1 | 0x8 | 0x40))  # SIOCSIFFLAGS UP
print("ready", flush=True)
sys.stdin.read()
"""


CARDAGENT = (sys.executable, "-m", "agent.cli")
UNSHARE = ("unshare", "--mount", "--net", "--propagation", "private", "--")


class StackError(RuntimeError):
    """A tool the stack needs is missing or did not come up."""


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else "")
    if not path:
        raise StackError(
            f"{name} not found: install the Debian package {package} (scripts/bootstrap)"
        )
    return path


def unshare_works() -> bool:
    """Private namespaces for pcscd: root and a kernel/container that allows them.
    ``CARDAGENT_TEST_SHARED_PCSCD=1`` forces the shared-/run/pcscd fallback."""
    if os.environ.get("CARDAGENT_TEST_SHARED_PCSCD") == "1":
        return False
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        [*UNSHARE, "true"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (one per vpcd slot)."""
    for _ in range(50):
        with contextlib.ExitStack() as held:
            first = held.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port > 65000:
                continue
            try:
                for offset in range(1, count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            return port
    raise StackError(f"no {count} consecutive free ports for vpcd")


def reader_name(index: int) -> str:
    """The PC/SC name of vpcd slot ``index``."""
    return READER_NAMES[index]


class PcscStack:
    """pcscd with two vpcd readers of two slots each (card, PSAM, second PSAM, spare);
    :meth:`slot` gives the virtual ICC side of each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pcscd_bin = require_tool("pcscd", "pcscd")
        if not VPCD_LIB.exists():
            raise StackError(f"{VPCD_LIB} missing: install the Debian package vsmartcard-vpcd")
        self.isolated = unshare_works()
        self.port = 35963 if self.isolated else _free_ports(VPCD_SLOTS)
        self.conf = root / "reader.conf.d"
        self.conf.mkdir(parents=True, exist_ok=True)
        # One file, so pcscd lists "Virtual PCD" first: vpcd slot i listens on port + i. The
        # second reader loads its own copy of the driver: ifd-vpcd keeps its slots in static
        # variables indexed by slot number, which two readers of one loaded library would share.
        second_lib = root / "libifdvpcd-2.so"
        shutil.copyfile(VPCD_LIB, second_lib)
        (self.conf / "vpcd").write_text(
            "".join(
                f'FRIENDLYNAME "{friendly}"\nDEVICENAME /dev/null:{self.port + offset}\n'
                f"LIBPATH {lib}\nCHANNELID {self.port + offset}\n\n"
                for friendly, offset, lib in (
                    ("Virtual PCD", 0, VPCD_LIB),
                    ("Virtual SAM", 2, second_lib),
                )
            ),
            encoding="ascii",
        )
        self.run_dir = root / "run"
        self.run_dir.mkdir(exist_ok=True)
        self.log_path = root / "pcscd.log"
        self.holder: subprocess.Popen[str] | None = None
        self.pcscd: subprocess.Popen[bytes] | None = None
        self._slots: dict[int, VpcdSlot] = {}
        self._log = self.log_path.open("ab")
        if self.isolated:
            self.socket_path = self.run_dir / "pcscd" / "pcscd.comm"
            self._start_holder()
        else:
            self.socket_path = Path("/run/pcscd/pcscd.comm")
        # Read once per process by libpcsclite; every pyscard call below goes to this pcscd.
        os.environ["PCSCLITE_CSOCK_NAME"] = str(self.socket_path)

    @property
    def netns_pid(self) -> int | None:
        return self.holder.pid if self.holder is not None else None

    def _start_holder(self) -> None:
        self.holder = subprocess.Popen(
            [*UNSHARE, sys.executable, "-c", _HOLDER, str(self.run_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            self.holder.kill()
            raise StackError(f"namespace holder did not start; see {self.log_path}")

    # -- pcscd ---------------------------------------------------------------------------------

    def start_pcscd(self, timeout: float = 10.0) -> None:
        """Start pcscd in the foreground and wait until it answers with vpcd's readers."""
        if self.pcscd is not None and self.pcscd.poll() is None:
            return
        if self.isolated:  # a killed pcscd leaves these behind in our private /run
            for stale in ("pcscd.comm", "pcscd.pid"):
                with contextlib.suppress(FileNotFoundError):
                    (self.socket_path.parent / stale).unlink()
        cmd = [self.pcscd_bin, "--foreground", "--debug", "--apdu", "-c", str(self.conf)]
        if self.holder is not None:
            cmd = ["nsenter", "-t", str(self.holder.pid), "--mount", "--net", *cmd]
        self.pcscd = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.wait_for_readers(list(READER_NAMES), timeout)

    def stop_pcscd(self, sig: int = signal.SIGTERM) -> None:
        """Stop pcscd (SIGKILL for a crash) and wait for it to exit."""
        proc, self.pcscd = self.pcscd, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart_pcscd(self, sig: int = signal.SIGTERM) -> None:
        self.stop_pcscd(sig)
        self.start_pcscd()

    def wait_for_readers(self, names: list[str], timeout: float = 10.0) -> None:
        from smartcard import scard  # after PCSCLITE_CSOCK_NAME is set

        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            if self.pcscd is not None and self.pcscd.poll() is not None:
                raise StackError(f"pcscd exited with {self.pcscd.returncode}; {self.tail()}")
            rv, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if rv == scard.SCARD_S_SUCCESS:
                rv, seen = scard.SCardListReaders(ctx, [])
                scard.SCardReleaseContext(ctx)
                if rv == scard.SCARD_S_SUCCESS and all(n in seen for n in names):
                    return
            time.sleep(0.1)
        raise StackError(f"pcscd did not show readers {names} (saw {seen}); {self.tail()}")

    def wait_card(self, reader: str, present: bool, timeout: float = 5.0) -> None:
        """Until pcscd shows a card in ``reader`` (or none). pcscd polls vpcd about every 0.4 s,
        and a card swapped faster than it looks is missed (§5.4 pitfall 8)."""
        from agent.readers.pcsc import survey

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = {i.name: i.card_present for i in survey()}
            if infos.get(reader) is present:
                return
            time.sleep(0.05)
        state = "a card" if present else "no card"
        raise StackError(f"pcscd did not show {state} in {reader!r} within {timeout} s")

    def tail(self, lines: int = 20) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "pcscd log tail:\n" + "\n".join(text)

    # -- virtual ICCs --------------------------------------------------------------------------

    def slot(self, index: int) -> VpcdSlot:
        """The virtual ICC side of vpcd slot ``index`` (0 = card reader, 1 = SAM reader,
        2 = second SAM reader; PC/SC names in :data:`READER_NAMES`)."""
        if not 0 <= index < VPCD_SLOTS:
            raise ValueError(f"vpcd slot {index} out of range 0..{VPCD_SLOTS - 1}")
        if index not in self._slots:
            self._slots[index] = VpcdSlot(
                self.port + index, netns_pid=self.netns_pid, name=f"vpcd slot {index}"
            )
        return self._slots[index]

    def clear_slots(self) -> None:
        """Take every ICC out and wait until pcscd has seen it go (before anything new goes in)."""
        for slot in self._slots.values():
            slot.remove()
        if self.pcscd is not None and self.pcscd.poll() is None:
            for index in self._slots:
                self.wait_card(reader_name(index), present=False)

    def close(self) -> None:
        for slot in self._slots.values():
            slot.close()
        self._slots.clear()
        self.stop_pcscd()
        if self.holder is not None:
            with contextlib.suppress(OSError):
                assert self.holder.stdin is not None
                self.holder.stdin.close()
            if self.holder.stdout is not None:
                self.holder.stdout.close()
            try:
                self.holder.wait(5)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait(5)
            self.holder = None
        self._log.close()


def cardagent_readers(profile: Path) -> subprocess.CompletedProcess[str]:
    """``cardagent readers --profile PROFILE`` in a subprocess (it reaches this session's pcscd
    through the inherited ``PCSCLITE_CSOCK_NAME``)."""
    return subprocess.run(
        [*CARDAGENT, "--log-level", "warning", "readers", "--profile", str(profile)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
