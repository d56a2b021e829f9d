"""``cardagent``: the validator, the records tools and provisioning (demo: ``cardhost demo``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from agent import card_cli, doctor, load_cli
from agent.clihelp import err, make_parser, run_command
from agent.errors import AgentError
from agent.logs import configure_logging
from agent.offline_store import OfflineStore, export_records
from agent.pos.cli import register as register_pos
from agent.profile import Profile, ReaderProfile, load_profile
from agent.progress import ProgressBar
from agent.runner import print_summary, run_agent
from agent.wiring import DataDir

log = structlog.get_logger(__name__)

DEFAULT_DATA_DIR = Path(os.environ.get("CARDAGENT_HOME", "/var/lib/cardagent"))


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_parser(), argv, configure_logging)


def _parser() -> argparse.ArgumentParser:
    parser = make_parser("cardagent", __doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("provision", help="create the device key and terminal identity")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--terminal-id", required=True)
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("keys", help="the device key: rotate it, or show the rotation's state")
    ksub = p.add_subparsers(required=True, metavar="ACTION")
    kp = ksub.add_parser(
        "rotate",
        help="create a new device key; the agent signs with it from its next start",
        description=(
            "Creates DATA_DIR/device.key.next and asks the running agent to restart. At its "
            "start the agent signs every new record with the new key; the old key is kept "
            "(device.key.old) until cardsync has had every record it signed acknowledged and "
            "the clearing host has accepted the new key (an operator authorises it first: "
            "cardhost terminal rotate-key ID --public-key HEX, or a one-time code stored with "
            "the console's 'provision code')."
        ),
    )
    kp.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    kp.add_argument("--who", default=os.environ.get("USER", "root"), help="for the record")
    kp.set_defaults(func=cmd_keys_rotate)
    kp = ksub.add_parser("status", help="the device keys and which records each signs")
    kp.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    kp.set_defaults(func=cmd_keys_status)

    p = sub.add_parser("run", help="run the validator loop")
    p.add_argument("--profile", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--reader-url", help="override the profile's reader URL")
    p.add_argument("--max-taps", type=int)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("records", help="list, export or verify the signed records")
    rsub = p.add_subparsers(required=True, metavar="ACTION")
    for name, func, text in (
        ("list", cmd_records_list, "print records"),
        ("export", cmd_records_export, "write records as JSON Lines"),
        ("verify", cmd_records_verify, "verify the hash chain and signatures"),
    ):
        rp = rsub.add_parser(name, help=text)
        rp.add_argument("--db", type=Path, help="store file (default: DATA_DIR/agent.db)")
        rp.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
        rp.set_defaults(func=func)
        if name == "list":
            rp.add_argument("--limit", type=int, default=50)
            rp.add_argument("--since", type=int, default=0, help="records after this seq")
        if name == "export":
            rp.add_argument("--out", type=Path, help="file (default: standard output)")

    p = sub.add_parser("readers", help="list the readers this agent can see")
    p.add_argument("--profile", type=Path, help="also probe the profile's own reader")
    p.set_defaults(func=cmd_readers)

    register_pos(sub, DEFAULT_DATA_DIR)
    from agent.kiosk.cli import register as register_kiosk

    register_kiosk(sub, DEFAULT_DATA_DIR)
    from agent.console.cli import register as register_console

    register_console(sub, DEFAULT_DATA_DIR)

    p = sub.add_parser("profile", help="validate a firmware profile")
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_profile_check)

    card_cli.register(sub)  # cardagent card read (agent/card_cli.py)
    load_cli.register(sub, DEFAULT_DATA_DIR)  # cardagent load (agent/load_cli.py)

    doctor.add_parser(sub, DEFAULT_DATA_DIR)

    p = sub.add_parser(
        "demo",
        help="this agent, the sync daemon and a local clearing host against simulated cards "
        "(runs 'cardhost demo'; needs the host extra)",
    )
    p.add_argument("--role", choices=DEMO_ROLES, default="bus", help="which device to show")
    p.add_argument("--data-dir", type=Path, help="where the demo keeps its files")
    p.add_argument("--seed", type=int, help="the simulated cards' seed")
    p.add_argument("--serve", action="store_true", help="kiosk: keep the page up until Ctrl-C")
    p.set_defaults(func=cmd_demo)

    return parser


# The roles of 'cardhost demo --role': a bus validator (fares: boarding, alighting, transfer,
# card types), a shop's POS counter, a self-service kiosk.
DEMO_ROLES = ("bus", "fares", "pos", "kiosk")


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo needs the clearing host, which the agent never imports (a validator does not
    install it): run it as its own program."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("clearinghost") is None:
        err("cardagent demo: the demo runs a local clearing host: pip install 'cardagent[host]'")
        return 2
    argv = [sys.executable, "-m", "clearinghost.cli"]
    argv += ["--log-format", args.log_format, "--log-level", args.log_level]
    argv += ["demo", "--role", args.role]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    if args.serve:
        argv.append("--serve")
    return subprocess.call(argv)  # noqa: S603 - our own interpreter and module, checked options


def cmd_provision(args: argparse.Namespace) -> int:
    key = DataDir(args.data_dir).provision(args.terminal_id)
    print(f"provisioned {args.terminal_id} in {args.data_dir}: device key {key.key_id}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from agent.console.restart import request_restart
    from agent.offline_store import DeviceKey, RecordBody
    from agent.wiring import DEVICE_KEY_FILE

    data_dir = DataDir(args.data_dir)
    current = DeviceKey.load(args.data_dir / DEVICE_KEY_FILE)
    new = data_dir.create_next_key()
    # a signed maintenance record (who, old and new key id), uploaded like any record
    with OfflineStore.open(data_dir.store_path, current, data_dir.terminal_id()) as store:
        store.append_record(
            RecordBody(
                "maintenance",
                "-",
                0,
                {
                    "who": f"cli:{args.who}",
                    "what": "device key rotation",
                    "old": current.key_id,
                    "new": new.key_id,
                },
            )
        )
    request_restart(args.data_dir)
    print(f"new device key {new.key_id}: public key {new.public_key_bytes.hex()}")
    print("in force from the agent's next start (a restart has been requested); the clearing")
    print("host must accept it first (an operator):")
    terminal = data_dir.terminal_id()
    print(f"  cardhost terminal rotate-key {terminal} --public-key {new.public_key_bytes.hex()}")
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    from agent.offline_store import DeviceKey
    from agent.offline_store.device_key import key_id_for
    from agent.wiring import NEXT_DEVICE_KEY_FILE, OLD_DEVICE_KEY_FILE

    with OfflineStore.open_for_reading(DataDir(args.data_dir).store_path) as store:
        epochs = store.key_epochs()
        acknowledged = store.acknowledged_seq()
    for index, (first, key) in enumerate(zip(epochs.firsts, epochs.keys, strict=True)):
        last = epochs.firsts[index + 1] - 1 if index + 1 < len(epochs.firsts) else None
        span = f"records {max(first, 1)}..{'' if last is None else last}"
        print(f"key {key_id_for(key)} signs {span}")
    print(f"acknowledged by the host through {acknowledged}")
    for name, text in (
        (NEXT_DEVICE_KEY_FILE, "waits for the agent's next start"),
        (OLD_DEVICE_KEY_FILE, "kept until the host accepts the new key"),
    ):
        path = args.data_dir / name
        if path.exists():
            print(f"{name}: key {DeviceKey.load(path).key_id} {text}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from agent.console.restart import RESTART_EXIT_STATUS, restart_requested

    stats = run_agent(
        load_profile(args.profile), DataDir(args.data_dir), args.reader_url, args.max_taps
    )
    print_summary(stats)
    # the console's 'restart': exit so that the service manager starts the agent again
    return RESTART_EXIT_STATUS if restart_requested(args.data_dir) else 0


def _open_records(args: argparse.Namespace) -> OfflineStore:
    path = args.db or DataDir(args.data_dir).store_path
    return OfflineStore.open_for_reading(path)


def cmd_records_list(args: argparse.Namespace) -> int:
    with _open_records(args) as store:
        for rec in store.records(since_seq=args.since, limit=args.limit):
            extra = " ".join(
                f"{k}={v}" for k, v in rec.fields.items() if k in ("tac", "counter", "reason")
            )
            print(
                f"{rec.seq:>6} {rec.created_at} {rec.kind:<10} {rec.card_id:<20} "
                f"{rec.amount / 100:8.2f} {extra}"
            )
    return 0


def cmd_records_export(args: argparse.Namespace) -> int:
    with _open_records(args) as store:
        if args.out:
            bar = ProgressBar("exporting")
            with args.out.open("w", encoding="utf-8") as out:
                count = export_records(store, out, progress=bar)
            bar.close()
            print(f"exported {count} records to {args.out}", file=sys.stderr)
        else:
            export_records(store, sys.stdout)
    return 0


def cmd_records_verify(args: argparse.Namespace) -> int:
    bar = ProgressBar("verifying")
    with _open_records(args) as store:
        report = store.verify(progress=bar)
    bar.close()
    for problem in report.problems:
        print(f"FAIL {problem}")
    if report.ok:
        print(f"OK: {report.checked} records, chain and signatures verified")
        return 0
    print(f"{len(report.problems)} problem(s) in {report.checked} records")
    return 1


def cmd_profile_check(args: argparse.Namespace) -> int:
    profile = load_profile(args.path)
    apps = ", ".join(f"{a.family.value}/{a.flow.value}" for a in profile.applications)
    print(f"{args.path}: OK ({profile.kind.value} profile '{profile.name}': {apps})")
    dialects = ", ".join(d.name for d in profile.dialects)
    print(f"issuer dialects, tried in this order: {dialects}")
    return 0


def cmd_readers(args: argparse.Namespace) -> int:
    """Every PC/SC reader, and the profile's serial module or nfcpy frontend, with what is in
    it. Exit status 1 when the profile's own reader cannot be reached."""
    profile = load_profile(args.profile) if args.profile else None
    rp = profile.reader if profile else None
    print(f"{'driver':<7} {'reader':<40} {'type':<28} contents")
    pcsc = _pcsc_lines(rp, _sam_readers(profile))
    for line in pcsc:
        print(line)
    if profile is None or rp is None:
        return 0
    if rp.driver == "pcsc":
        card_present = any(
            "contactless (card reader)" in line and "card present" in line for line in pcsc
        )
        name = rp.card_reader
    else:
        try:
            line = _serial_line(rp, _sam_slots(profile)) if rp.driver == "serial" else _nfc_line(rp)
        except AgentError as exc:
            print(f"{rp.driver:<7} {rp.url:<40} {'unreachable':<28} {exc.party} error: {exc}")
            return 1
        print(line)
        card_present = "card present" in line
        name = rp.url
    if card_present:
        # the card in the profile's reader, read-only: its printed number (issue 15)
        try:
            summary = card_cli.card_summary(profile)
        except AgentError as exc:
            summary = f"not read ({exc.party}: {exc})"
        print(f"{'card':<7} {name:<40} {'in the profile reader':<28} {summary}")
    return 0


def _sam_readers(profile: Profile | None) -> list[str]:
    """The PC/SC name patterns of every PSAM slot of the profile."""
    if profile is None:
        return []
    return [s.reader or profile.reader.sam_reader for s in profile.sam_slots]


def _sam_slots(profile: Profile) -> list[tuple[str, int]]:
    """(name, module SAM slot number) of every PSAM slot of a serial-module profile."""
    return [
        (s.name, profile.reader.sam_slot if s.slot is None else s.slot) for s in profile.sam_slots
    ]


def _pcsc_lines(rp: ReaderProfile | None, sam_readers: list[str]) -> list[str]:
    from fnmatch import fnmatchcase

    from agent.readers.pcsc import survey

    try:
        infos = survey()
    except AgentError as exc:
        return [f"{'pcsc':<7} {'-':<40} {'pcscd not available':<28} {exc}"]
    lines = []
    for info in infos:
        kind = "PC/SC reader"
        if rp is not None and rp.card_reader and fnmatchcase(info.name, rp.card_reader):
            kind = "contactless (card reader)"
        elif any(pattern and fnmatchcase(info.name, pattern) for pattern in sam_readers):
            kind = "contact (PSAM reader)"
        what = "PSAM" if kind.startswith("contact (") else "card"
        contents = f"{what} present, ATR {info.atr.hex().upper()}" if info.card_present else "empty"
        lines.append(f"{'pcsc':<7} {info.name:<40} {kind:<28} {contents}")
    return lines or [f"{'pcsc':<7} {'-':<40} {'no PC/SC readers':<28}"]


def _serial_line(rp: ReaderProfile, sam_slots: list[tuple[str, int]]) -> str:
    from agent.readers import serial_module as sm

    link = sm.SerialModuleLink(
        rp.url,
        framing=sm.Framing.from_mapping(rp.framing) if rp.framing else sm.Framing(),
        baudrate=rp.baudrate,
        timeout=rp.timeout_s,
    )
    try:
        version = link.request(sm.GET_VERSION).data.decode("ascii", "replace")
        card = link.request(sm.FIND_CARD)
        sams = [
            (name, number, link.request(sm.SAM_RESET, bytes((number,))).status == sm.STATUS_OK)
            for name, number in sam_slots
        ]
    finally:
        link.close()
    card_text = "card present" if card.status == sm.STATUS_OK else "no card"
    sam_text = "; ".join(
        f"{name}: {'PSAM' if present else 'no PSAM'} in slot {number}"
        for name, number, present in sams
    )
    return f"{'serial':<7} {rp.url:<40} {'module ' + version:<28} {card_text}; {sam_text}"


def _nfc_line(rp: ReaderProfile) -> str:
    from agent.readers.nfc import NfcReader

    reader = NfcReader(rp.url, timeout=rp.timeout_s)
    try:
        presence = reader.wait_for_card(0)
    finally:
        reader.close()
    contents = "empty" if presence is None else f"card present, UID {presence.uid.hex().upper()}"
    return f"{'nfcpy':<7} {rp.url:<40} {'contactless (nfcpy)':<28} {contents}"


if __name__ == "__main__":
    sys.exit(main())
