"""``cardagent console`` and ``cardagent technician set``: registered by :mod:`agent.cli`."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import structlog

from agent.console.auth import Credentials, check_name
from agent.console.device import ConsoleError, Device
from agent.console.serial_loop import DEFAULT_BAUDRATE, serve
from agent.console.session import Session
from agent.errors import ConfigurationError
from agent.wiring import DATA_DIR_MODE, DataDir

log = structlog.get_logger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], data_dir: Path) -> None:
    p = sub.add_parser("console", help="the technician console on a serial line")
    p.add_argument("--port", required=True, help="pyserial URL: /dev/ttyS0, a pty, socket://")
    p.add_argument("--baudrate", type=int, default=DEFAULT_BAUDRATE)
    p.add_argument("--data-dir", type=Path, default=data_dir)
    p.add_argument("--log-file", type=Path, help="what 'log tail' reads (DATA_DIR/agent.log)")
    p.add_argument("--no-echo", action="store_true", help="start without echo and prompts")
    p.set_defaults(func=cmd_console)

    p = sub.add_parser("technician", help="technician credentials for the console")
    tsub = p.add_subparsers(required=True, metavar="ACTION")
    tp = tsub.add_parser("set", help="create or replace a technician's password")
    tp.add_argument("name")
    tp.add_argument(
        "--password-file",
        type=Path,
        required=True,
        help="file whose first line is the password (never on the command line)",
    )
    tp.add_argument("--data-dir", type=Path, default=data_dir)
    tp.set_defaults(func=cmd_technician_set)


def cmd_console(args: argparse.Namespace) -> int:
    DataDir(args.data_dir).check_permissions()  # others must not be able to write it
    if not Credentials(args.data_dir, time.time).names():
        raise ConfigurationError(
            f"no technician can log in: run 'cardagent technician set NAME --password-file F "
            f"--data-dir {args.data_dir}' first"
        )
    device = Device(args.data_dir, log_file=args.log_file)
    session = Session(device, time.monotonic, echo=not args.no_echo)
    stop = threading.Event()
    try:
        serve(args.port, session, stop, baudrate=args.baudrate)
    except KeyboardInterrupt:
        stop.set()
    return 0


def cmd_technician_set(args: argparse.Namespace) -> int:
    try:
        lines = args.password_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"password file {args.password_file}: {exc}") from exc
    password = lines[0] if lines else ""
    check_name(args.name)
    if not args.data_dir.exists():  # before provisioning: the directory as provisioning makes it
        args.data_dir.mkdir(mode=DATA_DIR_MODE, parents=True)
        os.chmod(args.data_dir, DATA_DIR_MODE)
    device = Device(args.data_dir)
    try:
        change = device.plan_password(args.name, password)  # validated: nothing written yet
        if args.name not in Credentials(args.data_dir, time.time).names():
            change.old = "-"
        device.commit(change, f"cli:{os.environ.get('USER', 'root')}")
    except ConsoleError as exc:
        raise ConfigurationError(f"technician {args.name}: {exc.message}") from exc
    sys.stdout.write(f"technician {args.name}: password set in {args.data_dir}\n")
    return 0
