"""``cardagent doctor``: what this machine lacks to run the validator, one line per check.

Each check says ``ok``, ``warn`` or ``FAIL``, what it found, and for anything not ok how to fix
it. The exit status is 1 when any check failed (0 with warnings only), so an installer or a
technician's script can stop on it. Checks never change anything and never read a secret
(the device key's *mode* is checked, never its contents).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import pwd
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from agent.clock import RELEASE_DATE, midnight_utc
from agent.errors import AgentError
from agent.offline_store import OfflineStore
from agent.offline_store.device_key import KEY_FILE_MODE
from agent.profile import Profile, load_profile
from agent.wiring import DEVICE_KEY_FILE, STORE_FILE, TERMINAL_FILE

OK, WARN, FAIL = "ok", "warn", "FAIL"
SERVICE_USER = "cardagent"
DISK_WARN_BYTES = 512 * 1024 * 1024
DISK_FAIL_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    level: str  # ok / warn / FAIL
    found: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.level:<4} {self.name:<12} {self.found}"
        return f"{text}\n     {'':<12} fix: {self.fix}" if self.fix and self.level != OK else text


@dataclass(frozen=True, slots=True)
class Machine:
    """What the checks look at; tests replace the parts that are not on a test machine."""

    profile_path: Path
    data_dir: Path
    wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    service_user: str = SERVICE_USER


def run_checks(machine: Machine) -> list[Check]:
    checks: list[Check] = []
    profile = _profile(machine, checks)
    checks.extend(_data_dir(machine))
    checks.append(_device_key(machine))
    checks.append(_disk(machine))
    checks.append(_clock(machine, profile))
    if profile is not None:
        checks.extend(_hardware(profile))
    return checks


def _profile(machine: Machine, checks: list[Check]) -> Profile | None:
    try:
        profile = load_profile(machine.profile_path)
    except AgentError as exc:
        checks.append(
            Check(
                "profile",
                FAIL,
                str(exc),
                f"install a valid profile at {machine.profile_path} (check it with "
                "`cardagent profile FILE`; dialect files are read next to it)",
            )
        )
        return None
    checks.append(
        Check(
            "profile",
            OK,
            f"{machine.profile_path}: {profile.kind.value} profile '{profile.name}', "
            f"reader {profile.reader.driver}, clock policy {profile.clock_policy}",
        )
    )
    return profile


def _owner(st: os.stat_result) -> str:
    try:
        return pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        return str(st.st_uid)


def _data_dir(machine: Machine) -> Iterator[Check]:
    path = machine.data_dir
    try:
        st = path.stat()
    except FileNotFoundError:
        yield Check(
            "data dir",
            FAIL,
            f"{path} does not exist",
            f"sudo -u {machine.service_user} cardagent provision --data-dir {path} "
            "--terminal-id ID (deploy/install.sh creates it)",
        )
        return
    mode = stat.S_IMODE(st.st_mode)
    owner = _owner(st)
    if mode & 0o022:
        yield Check(
            "data dir",
            FAIL,
            f"{path} has mode {mode:04o}: other users can write it (the agent refuses it)",
            f"chmod go-w {path}",
        )
    elif not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        yield Check(
            "data dir",
            FAIL,
            f"{path} (owner {owner}, mode {mode:04o}) is not writable by this user",
            f"run as the service user ({machine.service_user}) or chown -R "
            f"{machine.service_user}: {path}",
        )
    elif _user_exists(machine.service_user) and owner != machine.service_user:
        yield Check(
            "data dir",
            WARN,
            f"{path} is owned by {owner}, not by the service user {machine.service_user}",
            f"chown -R {machine.service_user}:{machine.service_user} {path}",
        )
    else:
        yield Check("data dir", OK, f"{path}: owner {owner}, mode {mode:04o}")
    if not (path / TERMINAL_FILE).exists():
        yield Check(
            "identity",
            FAIL,
            f"{path / TERMINAL_FILE} missing: the device is not provisioned",
            f"cardagent provision --data-dir {path} --terminal-id ID",
        )
    else:
        yield Check("identity", OK, f"{path / TERMINAL_FILE} present")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _device_key(machine: Machine) -> Check:
    path = machine.data_dir / DEVICE_KEY_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check(
            "device key",
            FAIL,
            f"{path} missing",
            f"cardagent provision --data-dir {machine.data_dir} --terminal-id ID",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return Check(
            "device key",
            FAIL,
            f"{path} has mode {mode:04o}: other users can read it (the agent refuses it)",
            f"chmod {KEY_FILE_MODE:o} {path}",
        )
    if not os.access(path, os.R_OK):
        return Check(
            "device key",
            FAIL,
            f"{path} (owner {_owner(st)}) is not readable by this user",
            f"chown {machine.service_user} {path}",
        )
    return Check("device key", OK, f"{path}: mode {mode:04o}, owner {_owner(st)}")


def _disk(machine: Machine) -> Check:
    where = machine.data_dir if machine.data_dir.exists() else machine.data_dir.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return Check("disk", WARN, f"{where}: {exc.strerror}", "check the file system")
    text = f"{free / 2**20:.0f} MiB free on {where}"
    if free < DISK_FAIL_BYTES:
        return Check("disk", FAIL, text, "free space: records cannot be written when it is full")
    if free < DISK_WARN_BYTES:
        return Check("disk", WARN, text, "free space, or let cardsync upload and compact")
    return Check("disk", OK, text)


def _clock(machine: Machine, profile: Profile | None) -> Check:
    """The wall clock against the release date, the profile's not_before, the last record."""
    now = machine.wall().astimezone(dt.UTC)
    floors = [("this release", midnight_utc(RELEASE_DATE))]
    if profile is not None and profile.clock_not_before is not None:
        floors.append(("the profile's clock.not_before", midnight_utc(profile.clock_not_before)))
    store = machine.data_dir / STORE_FILE
    if store.exists():
        try:
            with OfflineStore.open_for_reading(store) as opened:
                last = opened.last_record_at()
        except AgentError:
            last = None
        if last is not None:
            floors.append(("the last record", last))
    for what, floor in floors:
        if now < floor:
            return Check(
                "clock",
                FAIL,
                f"reads {now.isoformat(timespec='seconds')}, before {what} "
                f"({floor.isoformat(timespec='seconds')})",
                "set the clock (timedatectl set-time, or hwclock --hctosys after fixing the RTC "
                "battery); the agent meanwhile applies the profile's [clock] policy",
            )
    return Check(
        "clock",
        OK,
        f"{now.isoformat(timespec='seconds')} (after {', '.join(w for w, _ in floors)})",
    )


def _hardware(profile: Profile) -> list[Check]:
    rp = profile.reader
    if profile.sam_kind == "software":
        return [Check("readers", WARN, "software SAM (test profile): no PSAM is used", "")]
    if rp.driver == "serial":
        return _serial(profile)
    if rp.driver == "nfcpy":
        checks = [_nfc(profile)]
        checks.extend(_pcsc(profile, need_card_reader=False))
        return checks
    return _pcsc(profile, need_card_reader=True)


def _pcsc(profile: Profile, *, need_card_reader: bool) -> list[Check]:
    from agent.readers.pcsc import survey

    try:
        infos = survey()
    except AgentError as exc:
        return [
            Check(
                "pcscd",
                FAIL,
                f"pcscd not reachable: {exc}",
                "apt-get install pcscd && systemctl enable --now pcscd.socket",
            )
        ]
    checks = [Check("pcscd", OK, f"running, {len(infos)} reader(s) visible")]
    rp = profile.reader
    if need_card_reader:
        card = [i for i in infos if rp.card_reader and fnmatchcase(i.name, rp.card_reader)]
        checks.append(
            Check("card reader", OK, f"{card[0].name}")
            if card
            else Check(
                "card reader",
                FAIL,
                f"no PC/SC reader matches {rp.card_reader!r} (seen: "
                f"{', '.join(i.name for i in infos) or 'none'})",
                "plug the contactless reader in, or fix reader.card_reader in the profile",
            )
        )
    for slot in profile.sam_slots:
        pattern = slot.reader or rp.sam_reader
        found = [i for i in infos if pattern and fnmatchcase(i.name, pattern)]
        if not found:
            checks.append(
                Check(
                    f"PSAM {slot.name}",
                    FAIL,
                    f"no PC/SC reader matches {pattern!r}",
                    "plug the PSAM reader in, or fix the slot's reader pattern in the profile",
                )
            )
        elif not found[0].card_present:
            checks.append(
                Check(
                    f"PSAM {slot.name}",
                    FAIL,
                    f"{found[0].name}: no PSAM in it",
                    "insert the PSAM (chip down, contacts in)",
                )
            )
        else:
            checks.append(
                Check(f"PSAM {slot.name}", OK, f"{found[0].name}: ATR {found[0].atr.hex().upper()}")
            )
    return checks


def _serial(profile: Profile) -> list[Check]:
    from agent.readers import serial_module as sm

    rp = profile.reader
    if "://" not in rp.url and not os.access(rp.url, os.R_OK | os.W_OK):
        exists = os.path.exists(rp.url)
        return [
            Check(
                "reader",
                FAIL,
                f"{rp.url}: {'no read/write access' if exists else 'no such device'}",
                f"add the service user to the dialout group (usermod -aG dialout {SERVICE_USER})"
                if exists
                else "plug the reader module in, or fix reader.url in the profile",
            )
        ]
    link = sm.SerialModuleLink(
        rp.url,
        framing=sm.Framing.from_mapping(rp.framing) if rp.framing else sm.Framing(),
        baudrate=rp.baudrate,
        timeout=rp.timeout_s,
    )
    checks: list[Check] = []
    try:
        version = link.request(sm.GET_VERSION).data.decode("ascii", "replace")
        checks.append(Check("reader", OK, f"{rp.url}: serial module {version}"))
        for slot in profile.sam_slots:
            number = rp.sam_slot if slot.slot is None else slot.slot
            present = link.request(sm.SAM_RESET, bytes((number,))).status == sm.STATUS_OK
            checks.append(
                Check(f"PSAM {slot.name}", OK, f"slot {number}: PSAM answers reset")
                if present
                else Check(
                    f"PSAM {slot.name}",
                    FAIL,
                    f"slot {number}: no PSAM answers",
                    "insert the PSAM in its slot, or fix the slot number in the profile",
                )
            )
    except AgentError as exc:
        checks.append(
            Check(
                "reader",
                FAIL,
                f"{rp.url}: {exc.party} error: {exc}",
                "check the cable, the module's power and reader.baudrate / framing",
            )
        )
    finally:
        link.close()
    return checks


def _nfc(profile: Profile) -> Check:
    from agent.readers.nfc import NfcReader

    rp = profile.reader
    try:
        reader = NfcReader(rp.url, timeout=rp.timeout_s)
        reader.close()
    except AgentError as exc:
        return Check(
            "reader",
            FAIL,
            f"{rp.url}: {exc.party} error: {exc}",
            "plug the NFC frontend in; the service user needs access to it (dialout / plugdev)",
        )
    return Check("reader", OK, f"{rp.url}: nfcpy frontend opened")


def report(checks: list[Check]) -> tuple[list[str], int]:
    """The lines to print and the exit status (1 if any check failed)."""
    lines = [c.line() for c in checks]
    failed = sum(c.level == FAIL for c in checks)
    warned = sum(c.level == WARN for c in checks)
    lines.append(f"{len(checks)} checks: {failed} failed, {warned} warning(s)")
    return lines, 1 if failed else 0


DEFAULT_PROFILE = Path(os.environ.get("CARDAGENT_PROFILE", "/etc/cardagent/profile.toml"))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], data_dir: Path) -> None:
    """Register ``cardagent doctor`` (agent/cli.py calls this)."""
    p = sub.add_parser(
        "doctor",
        help="check this machine: profile, data dir, device key, disk, clock, pcscd, readers, "
        "PSAM (exit 1 if any check fails)",
    )
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    p.add_argument("--data-dir", type=Path, default=data_dir)
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    lines, status = report(run_checks(Machine(args.profile, args.data_dir)))
    sys.stdout.write("\n".join(lines) + "\n")
    return status
