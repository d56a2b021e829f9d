"""The console's transport: a pyserial line (any URL: /dev/ttyS0, a pty, ``socket://``).

Thin on purpose: bytes in to :meth:`Session.feed`, bytes out to the port, :meth:`Session.tick`
every ``poll_s`` when the line is quiet. A line that fails (a USB adapter unplugged, the pty's
other end gone, the TCP peer closed) is a disconnect: the session drops whatever was half done
and logs out, and the port is opened again until ``stop`` is set.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import serial
import structlog

from agent.console.session import Session

log = structlog.get_logger(__name__)

DEFAULT_BAUDRATE = 115200


def open_port(url: str, baudrate: int, poll_s: float) -> serial.SerialBase:
    return serial.serial_for_url(
        url,
        baudrate=baudrate,
        bytesize=serial.EIGHTBITS,
        parity=serial.PARITY_NONE,
        stopbits=serial.STOPBITS_ONE,
        timeout=poll_s,
        write_timeout=5.0,
    )


def serve(
    url: str,
    session: Session,
    stop: threading.Event,
    *,
    baudrate: int = DEFAULT_BAUDRATE,
    poll_s: float = 0.2,
    reopen_s: float = 1.0,
    opener: Callable[[str, int, float], serial.SerialBase] = open_port,
) -> None:
    """Serve the console on ``url`` until ``stop`` is set."""
    while not stop.is_set():
        try:
            port = opener(url, baudrate, poll_s)
        except (serial.SerialException, OSError, ValueError) as exc:
            log.warning("console_port_unavailable", port=url, error=str(exc), retry_in_s=reopen_s)
            stop.wait(reopen_s)
            continue
        log.info("console_listening", port=url, baudrate=baudrate)
        try:
            port.write(session.open())
            while not stop.is_set():
                data = port.read(1)
                if data:
                    waiting = port.in_waiting
                    if waiting:
                        data += port.read(min(waiting, 4096))
                    out = session.feed(data)
                else:
                    out = session.tick()
                if out:
                    port.write(out)
        except (serial.SerialException, OSError) as exc:
            log.warning("console_line_lost", port=url, error=str(exc))
            session.disconnect()
            stop.wait(reopen_s)
        finally:
            with contextlib.suppress(serial.SerialException, OSError):
                port.close()
