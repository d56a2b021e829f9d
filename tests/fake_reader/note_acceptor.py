"""A simulated note acceptor on a TCP socket: the kiosk's pyserial driver connects to
``socket://127.0.0.1:PORT`` and speaks the line protocol of :mod:`agent.kiosk.notes`.

The test (or the demo) plays the customer and the device: :meth:`insert` sends ``ESCROW n`` then
``STACKED n``; :meth:`jam`, :meth:`escrow_only` (a note drawn in and never confirmed) and
:meth:`garbage` send the faults. Lines the kiosk sends (``ENABLE`` / ``DISABLE``) are kept in
:attr:`commands`; notes are only taken while enabled, as a real acceptor does.
"""

from __future__ import annotations

import socket
import threading
import time


class SimulatedNoteAcceptor:
    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.url = f"socket://127.0.0.1:{self.port}"
        self.commands: list[str] = []
        self.enabled = threading.Event()
        self._conn: socket.socket | None = None
        self._connected = threading.Event()
        self._closed = False
        threading.Thread(target=self._serve, name="note-acceptor", daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        self._conn = conn
        self._connected.set()
        buffer = b""
        while not self._closed:
            try:
                chunk = conn.recv(256)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = line.decode("ascii", "replace").strip()
                self.commands.append(command)
                if command == "ENABLE":
                    self.enabled.set()
                elif command == "DISABLE":
                    self.enabled.clear()

    def wait_enabled(self, timeout_s: float = 60.0) -> None:
        if not self.enabled.wait(timeout_s):
            raise AssertionError(f"the kiosk did not enable the note acceptor within {timeout_s} s")

    def send(self, raw: bytes) -> None:
        if not self._connected.wait(60):
            raise AssertionError("the kiosk never connected to the note acceptor")
        assert self._conn is not None
        self._conn.sendall(raw)

    def insert(self, fen: int) -> None:
        """A customer's note, drawn in and stacked."""
        self.wait_enabled()
        self.send(f"ESCROW {fen}\n".encode())
        time.sleep(0.05)
        self.send(f"STACKED {fen}\n".encode())

    def escrow_only(self, fen: int) -> None:
        """A note drawn in that the device never confirms (it times out mid-note)."""
        self.wait_enabled()
        self.send(f"ESCROW {fen}\n".encode())

    def jam(self, fen: int | None = None) -> None:
        self.wait_enabled()
        if fen is not None:
            self.send(f"ESCROW {fen}\n".encode())
        self.send(b"JAM\n")

    def garbage(self, raw: bytes = b"\x07\xffSTACKED 3.5e9 ??\n") -> None:
        self.send(raw)

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
        self._server.close()
