"""What the console's commands do to the device: the data directory, read and changed.

The interpreter (:mod:`agent.console.session`) never touches a file itself; it asks this
backend. A change is *planned* first (:class:`Change`: validated, nothing written) and applied
only after the technician confirms it (:meth:`Device.commit`): the new content is staged, a
signed ``maintenance`` record (who, what, old, new) is appended to the store, then the staged
content is put in place with one rename. A mistyped or malformed command therefore never
changes anything, and every change is in the record chain the clearing host receives.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

import agent
from agent.agent_status import AGENT_STATUS_FILE, read_status, staleness
from agent.blacklist import BLACKLIST_FILE, Blacklist
from agent.console import settings as settings_mod
from agent.console.auth import Credentials, password_problem
from agent.console.files import read_json, write_atomically
from agent.console.restart import RESTART_FLAG_FILE, request_restart
from agent.errors import AgentError, ConfigurationError
from agent.offline_store import DeviceKey, OfflineStore, RecordBody
from agent.offline_store.records import format_timestamp, parse_timestamp
from agent.params import PARAMS_FILE, ActiveParams
from agent.position import POSITION_FILE, PositionFile
from agent.profile import Profile, load_profile, parse_profile
from agent.terminal_id import terminal_id_problem
from agent.wiring import (
    DEVICE_KEY_FILE,
    ENROLMENT_CODE_FILE,
    NEXT_DEVICE_KEY_FILE,
    OLD_DEVICE_KEY_FILE,
    STORE_FILE,
    TERMINAL_FILE,
    DataDir,
)

log = structlog.get_logger(__name__)

PROFILE_FILE = "profile.toml"
PREVIOUS_PROFILE_FILE = "profile.previous.toml"
PRIOR_PROFILE_FILE = "profile.prior.toml"  # the swap in progress (see _install_profile)
FLUSH_FLAG_FILE = "sync.flush"  # sync.daemon.FLUSH_FLAG_FILE (the agent does not import sync)
LOG_FILE = "agent.log"
MAINTENANCE_KIND = "maintenance"
MAX_PROFILE_BYTES = 256 * 1024
MAX_CODE_LENGTH = 128
MIN_FREE_BYTES = 64 * 1024 * 1024
LOG_TAIL_MAX = 200
EARLIEST_SANE = datetime(2025, 1, 1, tzinfo=UTC)
LATEST_SANE = datetime(2100, 1, 1, tzinfo=UTC)

Fields = list[tuple[str, str]]


class ConsoleError(Exception):
    """An answer ``ERR code message``: ``code`` is stable, ``message`` says who failed."""

    def __init__(self, code: str, message: str, fields: Fields | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields or []


@dataclass
class Change:
    """A validated change, not applied yet. ``apply`` puts staged content in place."""

    what: str
    old: str
    new: str
    apply: Callable[[], Fields]
    shown: Fields = field(default_factory=list)
    record_after: bool = False  # provisioning: the store exists only afterwards


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now_utc(clock: Callable[[], float]) -> datetime:
    return datetime.fromtimestamp(clock(), UTC)


class Device:
    """The console's view of one data directory (the agent's and the sync daemon's)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        wall_clock: Callable[[], float] = time.time,
        log_file: Path | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data = DataDir(data_dir)
        self.path = data_dir
        self.clock = wall_clock
        self.monotonic = monotonic  # the agent status file's age (agent.agent_status)
        self.credentials = Credentials(data_dir, wall_clock)
        self.log_file = log_file or data_dir / LOG_FILE
        self._finish_profile_swap()

    # --- reading -------------------------------------------------------------------------

    def provisioned(self) -> bool:
        return (self.path / TERMINAL_FILE).exists()

    def status(self) -> Fields:
        out: Fields = []
        out.append(("terminal_id", self._terminal_id_or("not provisioned")))
        out.append(("software_version", agent.__version__))
        profile, problem = self._installed_profile()
        data = self._read_bytes(self.path / PROFILE_FILE)
        out.append(("profile", profile.name if profile else "none"))
        out.append(("profile_sha256", _sha256(data) if data is not None else "-"))
        if problem:
            out.append(("profile_error", problem))
        settings = settings_mod.read_settings(self.path)
        if profile is not None:
            rp = profile.reader
            out.append(("reader_driver", rp.driver))
            out.append(("reader_url", settings.get("reader_url") or rp.url or rp.card_reader))
            out.append(("sam", profile.sam_kind))
        out.extend(self._agent_figures())
        for name in ("line_id", "stop_id", "vehicle_id", "institution"):
            out.append((name, settings.get(name, "-")))
        if profile is not None:
            out.extend(self._place_figures(profile, settings))
        out.extend(self._store_figures())
        out.extend(self._key_figures())
        out.extend(self._list_figures())
        now = _now_utc(self.clock)
        out.append(("clock_utc", format_timestamp(now)))
        out.append(("clock_sane", "yes" if EARLIEST_SANE <= now < LATEST_SANE else "no"))
        out.append(("restart_pending", "yes" if (self.path / RESTART_FLAG_FILE).exists() else "no"))
        return out

    def agent_status(self) -> tuple[dict[str, Any] | None, str]:
        """The running agent's status file and ``""``, or what it last said (or ``None``) and
        why it does not describe a running agent (:func:`agent.agent_status.staleness`)."""
        try:
            document = read_status(self.path / AGENT_STATUS_FILE)
        except ValueError as exc:
            return None, f"agent status unreadable: {exc}"
        if document is None:
            return None, (
                f"agent not running: no {AGENT_STATUS_FILE} (the agent has not run on this "
                "data directory)"
            )
        return document, staleness(document, monotonic_now=self.monotonic())

    def _agent_figures(self) -> Fields:
        document, problem = self.agent_status()
        out: Fields = [("agent", "not running" if problem else "running")]
        if problem:
            out.append(("agent_problem", problem))
        if document is not None:
            for key in ("pid", "mode", "version", "started_at", "updated_at", "state"):
                out.append((f"agent_{key}", str(document.get(key, "-"))))
            out.append(("agent_taps", str(document.get("taps", "-"))))
            out.append(("agent_last_tap_at", str(document.get("last_tap_at") or "-")))
            out.append(("agent_clock", str(document.get("clock", "-"))))
        if problem or document is None:
            out.append(("reader_present", f"unknown ({problem})"))
            return out
        reader = document.get("reader")
        reader = reader if isinstance(reader, dict) else {}
        out.append(("reader", f"{reader.get('driver', '?')} {reader.get('location', '?')}"))
        out.append(("reader_present", _reader_state(reader)))
        out.append(("reader_checked_at", str(document.get("reader_checked_at") or "-")))
        out.append(("card_present", "yes" if reader.get("card_present") else "no"))
        if document.get("hardware_error"):
            out.append(("hardware_error", str(document["hardware_error"])))
        for slot in _slots(document):
            name = slot.get("name", "?")
            out.append((f"psam.{name}.state", str(slot.get("state", "?"))))
            out.append((f"psam.{name}.location", str(slot.get("location", "-"))))
            out.append((f"psam.{name}.serial", str(slot.get("serial") or "-")))
            out.append((f"psam.{name}.terminal", str(slot.get("terminal") or "-")))
            apps = slot.get("applications") or []
            out.append((f"psam.{name}.applications", ",".join(map(str, apps)) or "-"))
            out.append((f"psam.{name}.selected", str(slot.get("application") or "-")))
            if slot.get("error"):
                out.append((f"psam.{name}.error", str(slot["error"])))
        return out

    def _place_figures(self, profile: Profile, settings: dict[str, str]) -> Fields:
        """Line and stop the agent uses at the next tap, and where they come from
        (agent.position: position.json, else the settings, else the profile)."""
        site = settings_mod.site_settings(settings)
        place = PositionFile(self.path / POSITION_FILE, profile, lambda: site).current()
        if (self.path / POSITION_FILE).exists():
            source = POSITION_FILE
        elif site.line is not None or site.stop is not None:
            source = "settings"
        else:
            source = "profile"
        in_force = site.apply(profile)
        return [
            ("line_in_force", "-" if place is None else str(place.line)),
            ("stop_in_force", "-" if place is None else str(place.stop)),
            ("place_source", source if place is not None else f"{source} (invalid: no place)"),
            ("vehicle_in_force", str(in_force.vehicle)),
            ("institution_in_force", in_force.institution.hex().upper() or "-"),
        ]

    def _key_figures(self) -> Fields:
        """The device key (its id only) and a key rotation under way (agent.wiring)."""
        out: Fields = []
        for name, label in (
            (DEVICE_KEY_FILE, "device_key_id"),
            (NEXT_DEVICE_KEY_FILE, "device_key_next"),
            (OLD_DEVICE_KEY_FILE, "device_key_old"),
        ):
            path = self.path / name
            if not path.exists():
                continue
            try:
                out.append((label, DeviceKey.load(path).key_id))
            except AgentError as exc:
                out.append((label, f"unreadable: {exc}"))
        labels = {label for label, _ in out}
        if "device_key_next" in labels:
            rotation = "pending: the new key signs from the agent's next start"
        elif "device_key_old" in labels:
            rotation = (
                "in progress: the old key is kept until the host has accepted the new key "
                "and acknowledged every record the old one signed"
            )
        else:
            rotation = "none"
        return [*out, ("key_rotation", rotation)]

    def _terminal_id_or(self, default: str) -> str:
        try:
            return self.data.terminal_id()
        except AgentError:
            return default

    def _installed_profile(self) -> tuple[Profile | None, str]:
        path = self.path / PROFILE_FILE
        if not path.exists():
            return None, ""
        try:
            return load_profile(path), ""
        except ConfigurationError as exc:
            return None, str(exc)

    @staticmethod
    def _read_bytes(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConsoleError("store", f"store: cannot read {path}: {exc.strerror}") from exc

    def _store_figures(self) -> Fields:
        path = self.path / STORE_FILE
        if not path.exists():
            return [("store", "absent")]
        try:
            with OfflineStore.open_for_reading(path) as store:
                oldest = store.oldest_unsent_created_at()
                return [
                    ("last_seq", str(store.last_seq())),
                    ("queue_depth", str(store.count_unsent())),
                    ("acknowledged_seq", str(store.acknowledged_seq())),
                    ("oldest_unsent", "-" if oldest is None else format_timestamp(oldest)),
                    ("quarantined_records", str(store.count_quarantined())),
                ]
        except AgentError as exc:
            return [("store_error", str(exc))]

    def _list_figures(self) -> Fields:
        out: Fields = []
        try:
            health = Blacklist.open(
                self.path / BLACKLIST_FILE, auto_refresh_s=None, lookups=False
            ).health()
            out.append(("blacklist_version", str(health["blacklist_version"])))
            out.append(("blacklist_expires_at", str(health["blacklist_expires_at"] or "-")))
            out.append(("blacklist_expired", "yes" if health["blacklist_expired"] else "no"))
        except AgentError as exc:
            out.append(("blacklist_error", str(exc)))
        try:
            params = read_json(self.path / PARAMS_FILE)
        except AgentError as exc:
            return [*out, ("params_error", str(exc))]
        payload = params.get("payload", params) if params else None
        if not isinstance(payload, dict):
            return [*out, ("params_version", "none")]
        out.append(("params_version", str(payload.get("version", "-"))))
        in_force = ActiveParams(self.path / PARAMS_FILE, clock=self.clock).current()
        # in force: verified under the pinned host key and within its validity window
        out.append(("params_in_force", "yes" if in_force is not None else "no"))
        expires = payload.get("expires_at")
        out.append(
            (
                "params_expires_at",
                format_timestamp(datetime.fromtimestamp(expires, UTC))
                if isinstance(expires, int)
                else "-",
            )
        )
        try:
            checks = read_json(self.path / "lists-checked.json") or {}
        except AgentError:
            checks = {}
        for name, at in sorted(checks.items()):
            if isinstance(at, int | float):
                stamp = format_timestamp(datetime.fromtimestamp(at, UTC))
                out.append((f"{name}_checked_at", stamp))
        return out

    def get_settings(self) -> Fields:
        settings = settings_mod.read_settings(self.path)
        return [(name, settings.get(name, "-")) for name in settings_mod.SETTINGS]

    def selftest(self) -> tuple[Fields, int]:
        """Every check as ``check.NAME=ok|fail|skipped detail``; returns (fields, failures)."""
        results: list[tuple[str, str, str]] = []

        def check(name: str, run: Callable[[], str]) -> None:
            try:
                results.append((name, "ok", run()))
            except (AgentError, OSError, ValueError) as exc:
                results.append((name, "fail", str(exc)))

        check("data_dir", self._check_data_dir)
        check("device_key", self._check_device_key)
        check("store_integrity", self._check_integrity)
        check("record_chain", self._check_chain)
        check("clock", self._check_clock)
        check("disk_space", self._check_disk)
        check("profile", self._check_profile)
        # The reader and the PSAMs are the running agent's: judged from its status file, and
        # failed (never skipped, never silently OK) when the file is stale or absent.
        document, problem = self.agent_status()
        if problem or document is None:
            for name in ("agent", "reader", "psam"):
                results.append((name, "fail", problem))
        else:
            results.append(("agent", "ok", _agent_line(document)))
            reader = document.get("reader")
            reader = reader if isinstance(reader, dict) else {}
            state = _reader_state(reader)
            if reader.get("present") is True:
                detail = f"{state}, {reader.get('location', '?')} answered at "
                results.append(("reader", "ok", detail + str(document.get("reader_checked_at"))))
            else:
                results.append(("reader", "fail", state))
            slots = _slots(document)
            if not slots:
                results.append(("psam", "fail", "the agent reports no SAM slot"))
            for slot in slots:
                name = f"psam.{slot.get('name', '?')}"
                if slot.get("open") is True and slot.get("terminal"):
                    detail = f"serial {slot.get('serial')} terminal {slot.get('terminal')}"
                    results.append((name, "ok", detail))
                else:
                    why = slot.get("error") or "not open"
                    results.append((name, "fail", f"no answer from the PSAM: {why}"))
        fields = [(f"check.{n}", f"{state} {detail}".strip()) for n, state, detail in results]
        return fields, sum(1 for _, state, _ in results if state == "fail")

    def _check_data_dir(self) -> str:
        self.data.check_permissions()
        return str(self.path)

    def _check_device_key(self) -> str:
        return f"key id {DeviceKey.load(self.path / DEVICE_KEY_FILE).key_id}"

    def _check_integrity(self) -> str:
        with OfflineStore.open_for_reading(self.path / STORE_FILE) as store:
            result = store.integrity_check()
        if result != "ok":
            raise ValueError(f"PRAGMA integrity_check: {result[:200]}")
        return "PRAGMA integrity_check ok"

    def _check_chain(self) -> str:
        with OfflineStore.open_for_reading(self.path / STORE_FILE) as store:
            report = store.verify()
        if not report.ok:
            raise ValueError(f"{len(report.problems)} problem(s): {report.problems[0]}")
        return f"{report.checked} records verified"

    def _check_clock(self) -> str:
        now = _now_utc(self.clock)
        if not EARLIEST_SANE <= now < LATEST_SANE:
            raise ValueError(f"clock reads {format_timestamp(now)}: not a plausible date")
        path = self.path / STORE_FILE
        if path.exists():
            with OfflineStore.open_for_reading(path) as store:
                last = store.last_seq()
                newest = next(iter(store.records(since_seq=max(0, last - 1), limit=1)), None)
            if newest is not None and parse_timestamp(newest.created_at) > now:
                raise ValueError(
                    f"clock reads {format_timestamp(now)}, before record {newest.seq} "
                    f"({newest.created_at}): it went back"
                )
        return format_timestamp(now)

    def _check_disk(self) -> str:
        usage = shutil.disk_usage(self.path)
        if usage.free < MIN_FREE_BYTES:
            raise ValueError(f"{usage.free // 2**20} MiB free, below {MIN_FREE_BYTES // 2**20}")
        return f"{usage.free // 2**20} MiB free"

    def _check_profile(self) -> str:
        profile, problem = self._installed_profile()
        if profile is None:
            raise ValueError(problem or f"no {PROFILE_FILE} in the data directory")
        return profile.name

    def records_verify(self) -> tuple[Fields, list[str]]:
        path = self.path / STORE_FILE
        if not path.exists():
            raise ConsoleError("store", f"store: {path} does not exist (not provisioned?)")
        try:
            with OfflineStore.open_for_reading(path) as store:
                report = store.verify()
        except AgentError as exc:
            raise ConsoleError(exc.party, str(exc)) from exc
        return [("checked", str(report.checked))], list(report.problems)

    def log_tail(self, count: int) -> Fields:
        try:
            with self.log_file.open("rb") as handle:
                size = handle.seek(0, 2)
                handle.seek(max(0, size - 256 * 1024))
                chunk = handle.read()
        except FileNotFoundError as exc:
            raise ConsoleError("no_log", f"no log file at {self.log_file}") from exc
        except OSError as exc:
            raise ConsoleError("no_log", f"log file {self.log_file}: {exc.strerror}") from exc
        lines = chunk.decode("utf-8", "replace").splitlines()[-count:]
        shown = ["".join(c if c.isprintable() else "?" for c in line)[:400] for line in lines]
        return [("log", line) for line in shown]

    def public_key_fields(self) -> Fields:
        key = DeviceKey.load(self.path / DEVICE_KEY_FILE)
        return [
            ("terminal_id", self.data.terminal_id()),
            ("key_id", key.key_id),
            ("public_key", key.public_key_bytes.hex()),
        ]

    # --- actions without confirmation ----------------------------------------------------

    def sync_now(self) -> Fields:
        flag = self.path / FLUSH_FLAG_FILE
        try:
            flag.touch()
        except OSError as exc:
            raise ConsoleError("store", f"store: cannot create {flag}: {exc.strerror}") from exc
        return [("flush_flag", str(flag))]

    def check_password(self, name: str, password: str) -> tuple[bool, float, int]:
        result = self.credentials.check(name, password)
        return result.ok, result.retry_after_s, result.failures

    def locked_for(self) -> float:
        return self.credentials.locked_for()

    # --- planned changes -----------------------------------------------------------------

    def plan_set(self, name: str, value: str) -> Change:
        try:
            settings_mod.validate(name, value)
        except ConfigurationError as exc:
            raise ConsoleError("bad_value", str(exc)) from exc
        settings = settings_mod.read_settings(self.path)
        old = settings.get(name, "-")
        new_settings = {**settings, name: value}
        effect: Fields = [("takes_effect", settings_mod.SETTINGS[name].takes_effect)]
        if name in ("line_id", "stop_id") and (self.path / POSITION_FILE).exists():
            effect.append(
                (
                    "note",
                    f"{POSITION_FILE} (the live position feed) is present and wins for line "
                    "and stop while it is",
                )
            )

        def apply() -> Fields:
            settings_mod.write_settings(self.path, new_settings)
            return [(name, value), *effect]

        return Change(f"set {name}", old, value, apply, [("setting", name), *effect])

    def plan_provision(self, terminal_id: str) -> Change:
        if self.provisioned():
            raise ConsoleError(
                "already_provisioned",
                f"{self.path} is provisioned as {self._terminal_id_or('?')}; nothing changed",
            )
        problem = terminal_id_problem(terminal_id)
        if problem is not None:
            raise ConsoleError("bad_value", problem)

        def apply() -> Fields:
            self.data.provision(terminal_id)
            return self.public_key_fields()

        return Change("provision", "-", terminal_id, apply, record_after=True)

    def plan_enrolment_code(self, code: str) -> Change:
        if not self.provisioned():
            raise ConsoleError("not_provisioned", "provision the device first: provision ID")
        if not 1 <= len(code) <= MAX_CODE_LENGTH or not code.isprintable() or " " in code:
            raise ConsoleError("bad_value", f"an enrolment code is 1..{MAX_CODE_LENGTH} printable")
        path = self.path / ENROLMENT_CODE_FILE
        old = "present" if path.exists() else "-"

        def apply() -> Fields:
            write_atomically(path, (code + "\n").encode("utf-8"), 0o600)
            return [("enrolment_code_file", str(path))]

        # the code itself is a credential: never in the record, an answer or a log
        return Change("enrolment code", old, "set", apply)

    def plan_profile(self, text: str) -> Change:
        data = text.encode("utf-8")
        if len(data) > MAX_PROFILE_BYTES:
            raise ConsoleError("profile_invalid", f"profile larger than {MAX_PROFILE_BYTES} bytes")
        profile = self.validate_profile(text)
        old = self._profile_label(self._read_bytes(self.path / PROFILE_FILE))
        new = f"{profile.name} sha256:{_sha256(data)}"

        def apply() -> Fields:
            self._install_profile(data)
            return [("profile", profile.name), ("profile_sha256", _sha256(data))]

        shown = [("name", profile.name), ("kind", profile.kind.value), ("sha256", _sha256(data))]
        return Change("profile load", old, new, apply, shown)

    def plan_rollback(self) -> Change:
        previous = self._read_bytes(self.path / PREVIOUS_PROFILE_FILE)
        if previous is None:
            raise ConsoleError("no_previous", "there is no previous profile to roll back to")
        try:
            profile = self.validate_profile(previous.decode("utf-8"))
        except (ConsoleError, UnicodeDecodeError) as exc:
            raise ConsoleError("profile_invalid", f"the previous profile: {exc}") from exc
        old = self._profile_label(self._read_bytes(self.path / PROFILE_FILE))
        new = f"{profile.name} sha256:{_sha256(previous)}"

        def apply() -> Fields:
            self._install_profile(previous)
            return [("profile", profile.name), ("profile_sha256", _sha256(previous))]

        return Change("profile rollback", old, new, apply, [("name", profile.name)])

    def plan_password(self, name: str, password: str) -> Change:
        problem = password_problem(password)
        if problem is not None:
            raise ConsoleError("bad_value", problem)

        def apply() -> Fields:
            self.credentials.set_password(name, password)
            return [("technician", name)]

        return Change("technician password", "(hidden)", "(hidden)", apply)

    def plan_key_rotation(self) -> Change:
        """A new device key (agent.wiring: ``device.key.next``), in force from the agent's
        next start (a restart is requested); the record names the old and the new key id."""
        if not self.provisioned():
            raise ConsoleError("not_provisioned", "no device key yet: provision TERMINAL_ID")
        for name, why in (
            (NEXT_DEVICE_KEY_FILE, "a new key already waits for the agent's restart"),
            (
                OLD_DEVICE_KEY_FILE,
                "the previous rotation is not finished (the host has not yet accepted the new "
                "key and acknowledged every record the old one signed)",
            ),
        ):
            if (self.path / name).exists():
                raise ConsoleError("rotation_in_progress", f"{why}; nothing changed")
        current = DeviceKey.load(self.path / DEVICE_KEY_FILE)
        change = Change(
            "device key rotation",
            current.key_id,
            "a new key, created on confirm",
            lambda: [],
            [("takes_effect", "the agent's next start (a restart is requested)")],
            record_after=True,  # the record names the new key's id
        )

        def apply() -> Fields:
            key = self.data.create_next_key()
            change.new = key.key_id
            request_restart(self.path)
            public = key.public_key_bytes.hex()
            return [
                ("new_key_id", key.key_id),
                ("public_key", public),
                ("restart", "requested"),
                (
                    "host_command",
                    f"cardhost terminal rotate-key {self.data.terminal_id()} --public-key {public}",
                ),
            ]

        change.apply = apply
        return change

    def plan_restart(self) -> Change:
        def apply() -> Fields:
            return [("restart_flag", str(request_restart(self.path)))]

        return Change("restart", "-", "requested", apply)

    def commit(self, change: Change, who: str) -> Fields:
        """Apply a confirmed change and leave its signed maintenance record."""
        if not change.record_after:
            self._record(change, who)
        try:
            applied = change.apply()
        except (AgentError, OSError) as exc:
            party = exc.party if isinstance(exc, AgentError) else "store"
            if not change.record_after:
                self._record(change, who, result=f"failed: {exc}"[:300])
            raise ConsoleError(party, f"{party}: {change.what} failed: {exc}") from exc
        if change.record_after:
            self._record(change, who)
        log.info("console_change", what=change.what, who=who, old=change.old, new=change.new)
        return applied

    def _record(self, change: Change, who: str, result: str = "applied") -> None:
        if not self.provisioned():
            return  # no device key and no store yet: nothing to sign with
        fields: dict[str, str | int | bool | None] = {
            "who": who,
            "what": change.what,
            "old": change.old,
            "new": change.new,
            "via": "console",
            "result": result,
        }
        try:
            self.data.check_permissions()
            key = DeviceKey.load(self.path / DEVICE_KEY_FILE)
            with OfflineStore.open(self.data.store_path, key, self.data.terminal_id()) as store:
                store.append_record(RecordBody(MAINTENANCE_KIND, "-", 0, fields))
        except AgentError as exc:
            raise ConsoleError(
                "store",
                f"{exc.party}: the maintenance record could not be written, nothing changed: {exc}",
            ) from exc

    # --- profiles --------------------------------------------------------------------------

    def validate_profile(self, text: str) -> Profile:
        """The whole profile, as ``cardagent run`` would load it; errors name the line."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            match = re.search(r"line (\d+)", str(exc))
            fields = [("line", match.group(1))] if match else []
            raise ConsoleError("profile_invalid", f"not TOML: {exc}", fields) from exc
        try:
            return parse_profile(raw, source="pasted profile", base_dir=self.path)
        except ConfigurationError as exc:
            line = _line_of(text, str(exc))
            fields = [("line", str(line))] if line else []
            raise ConsoleError("profile_invalid", str(exc), fields) from exc

    @staticmethod
    def _profile_label(data: bytes | None) -> str:
        if data is None:
            return "-"
        try:
            name = tomllib.loads(data.decode("utf-8")).get("profile", {}).get("name", "?")
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
            name = "?"
        return f"{name} sha256:{_sha256(data)}"

    def _install_profile(self, data: bytes) -> None:
        """Put ``data`` in force and keep the one it replaces as the previous profile.

        Crash-safe in three renames: (1) the current profile is copied to the *prior* file,
        (2) the new one replaces ``profile.toml``, (3) the prior file becomes the previous one.
        A crash between them is finished (or undone) by :meth:`_finish_profile_swap`."""
        current = self._read_bytes(self.path / PROFILE_FILE)
        if current is not None:
            write_atomically(self.path / PRIOR_PROFILE_FILE, current)
        write_atomically(self.path / PROFILE_FILE, data)
        if current is not None:
            (self.path / PRIOR_PROFILE_FILE).replace(self.path / PREVIOUS_PROFILE_FILE)

    def _finish_profile_swap(self) -> None:
        prior = self.path / PRIOR_PROFILE_FILE
        if not prior.exists():
            return
        if self._read_bytes(prior) == self._read_bytes(self.path / PROFILE_FILE):
            prior.unlink()  # crashed before the new profile was in place: nothing happened
        else:
            prior.replace(self.path / PREVIOUS_PROFILE_FILE)


def _reader_state(reader: dict[str, Any]) -> str:
    present = reader.get("present")
    if present is True:
        return "yes"
    if present is None:
        return "not checked yet (the agent is opening it)"
    return f"no: {reader.get('error') or 'failed'}"


def _slots(document: dict[str, Any]) -> list[dict[str, Any]]:
    sams = document.get("sams")
    return [s for s in sams if isinstance(s, dict)] if isinstance(sams, list) else []


def _agent_line(document: dict[str, Any]) -> str:
    return (
        f"{document.get('mode', '?')} pid {document.get('pid')} since "
        f"{document.get('started_at')}, status of {document.get('updated_at')}"
    )


def _line_of(text: str, message: str) -> int | None:
    """The line of the pasted profile that a validation message's field is on (best effort):
    ``field 'terminal.line'`` → the ``line =`` key under ``[terminal]``;
    ``... cpu_purse.applications[1]: field 'select'`` → in the second
    ``[[cpu_purse.applications]]``."""
    match = re.search(r"field '([^']+)'", message)
    if match is None:
        return None
    dotted = match.group(1)
    array = re.search(r"([A-Za-z0-9_.]+)\[(\d+)\]: field", message)
    lines = text.splitlines()
    if array is not None:
        table, index = array.group(1), int(array.group(2))
        return _key_in_table(lines, table, dotted, occurrence=index, array=True)
    parts = re.sub(r"\[\d+\]", "", dotted).split(".")
    for cut in range(len(parts) - 1, -1, -1):
        table, key = ".".join(parts[:cut]), ".".join(parts[cut:])
        found = _key_in_table(lines, table, key)
        if found:
            return found
    return None


def _key_in_table(
    lines: list[str], table: str, key: str, *, occurrence: int = 0, array: bool = False
) -> int | None:
    header = f"[[{table}]]" if array else f"[{table}]"
    key_line = re.compile(rf"\s*{re.escape(key)}\s*=")
    current = "" if not table else None
    seen = -1
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("["):
            if stripped.split("#", 1)[0].strip() == header:
                seen += 1
                current = table if seen == occurrence else None
            else:
                current = None
            continue
        if current == table and key_line.match(line):
            return number
    return None
