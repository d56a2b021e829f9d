"""``cardsync run``: the sync daemon beside the agent (apscheduler jobs, one process).

Jobs
    upload     every ``check_interval_s``: uploads when ``upload_threshold`` records are queued,
               when ``upload_interval_s`` has passed since the last upload, or on a flush request
               (SIGUSR1, or the flag file ``sync.flush`` in the data directory). Streams the
               backlog ``batch_size`` records at a time (memory stays bounded), marks only what
               the host acknowledged in an answer signed by the pinned host key (an unsigned,
               forged or inconsistent answer marks nothing: logged, backed off), then
               compacts acknowledged records older than ``compact_after_s`` (but never the
               records a fare cap in force counts: today's, this month's). A record the
               store has quarantined (or finds corrupted now) goes as its signed quarantine
               notice, so the upload goes on past it (:mod:`sync.protocol`).
    blacklist  pulls the host's newer root statements (``agent.trust``: a rotation or
               revocation of the signing keys, accepted only if the root in force signed it),
               then a delta (or snapshot), and applies it atomically (``agent.blacklist``).
    printed_blacklist  the same for the printed-number list (a key space of its own, scoped by
               issuer, its own file); a separate job, so its failures never delay the serial
               list (an old host's unscoped CBLPRN03 list is refused there, by name).
    params     the same root pull, then the signed parameter set. On start the daemon pins
               its ``--host-public-key`` (root keys, ``--root-threshold``) for the agent in
               ``root.json`` with the accepted statements, and ``host-key.pub`` (the agent
               verifies ``params.json`` against the signing keys of that chain).
    heartbeat  posts health figures: unsent records and the age of the oldest, blacklist
               version and age, parameter version, store size, last error, and the
               terminal's clock offset from the host's time (``clock_offset_s``: this clock
               minus the host's HTTP ``Date``; kept in ``clock-offset.json`` for
               ``cardsync status``).
    watchdog   under systemd (``NOTIFY_SOCKET``, ``WatchdogSec=``): ``WATCHDOG=1`` at half the
               watchdog interval, sent from a scheduler job, so a scheduler whose workers are
               all stuck stops the pings and systemd restarts the daemon. ``READY=1`` once the
               jobs are scheduled, ``STOPPING=1`` on shutdown, ``STATUS=`` after each heartbeat.

Failures
    Link and transient host failures (timeouts, resets, 5xx, 507 disk full) are retried with
    exponential backoff and full jitter, within a call (``retries``) and across runs of the
    job; a ``Retry-After`` from the host (503 ``busy`` when its upload slots are full) is a
    floor on that delay, capped at ``retry_after_max_s`` and spread by up to
    ``retry_after_spread`` of itself so terminals told the same delay do not return together.
    Uploads are always safe to retry: the batch has an idempotency key and the host keeps
    ``(terminal_id, seq)`` unique. A refused list (forged, rolled back, expired) is logged and
    never applied. Every answer is read with a bounded size and bounded inflation
    (:mod:`sync.client`): a larger one is a :class:`ProtocolError`, nothing applied. SIGTERM
    stops the jobs between batches; an in-flight request finishes or times out, and
    either way nothing is lost (unacknowledged records are sent again).

The daemon shares the agent's SQLite file (WAL); each of its writes is one short transaction
(the ack cursor, a compaction), so taps never wait on it for long.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from agent.blacklist import (
    BLACKLIST_FILE,
    PRINTED_BLACKLIST_FILE,
    SPACE_PRINTED,
    SPACE_SERIAL,
    UNSCOPED_PRINTED_FILE,
    ApplyResult,
    Blacklist,
    BlacklistBaseMismatch,
    BlacklistFileError,
    BlacklistRejected,
    IncomingList,
    write_atomically,
)
from agent.clock import CLOCK_OFFSET_FILE
from agent.errors import AgentError, StoreError
from agent.offline_store import DeviceKey, OfflineStore, QuarantineNotice
from agent.offline_store.device_key import key_id_for
from agent.params import write_host_key
from agent.products.fare_policy import FarePolicyError, accumulator_since, parse_fare_policy
from agent.sdnotify import Notifier, Watchdog
from agent.terminal_id import check_terminal_id
from agent.trust import ROOT_FILE, RootFile, RootRejected, pinned_root
from agent.wiring import DEVICE_KEY_FILE, ENROLMENT_CODE_FILE, OLD_DEVICE_KEY_FILE, DataDir
from sync.client import ClientTls, SyncClient
from sync.errors import (
    HostBusy,
    HostError,
    HostUnreachable,
    ListRejected,
    ProtocolError,
    UnknownSigner,
)
from sync.params import PARAMS_FILE, ParamSet, ParamsFile
from sync.protocol import Ack, UploadBatch, encode_batch

log = structlog.get_logger(__name__)
T = TypeVar("T")

FLUSH_FLAG_FILE = "sync.flush"
# When the host last gave a list that verified (freeze protection: how stale the terminal's
# view may be, kept across restarts; ``cardsync status`` shows it).
CHECKS_FILE = "lists-checked.json"
_RETRYABLE = (HostUnreachable, HostBusy)
CLOCK_OFFSET_WARN_S = 60.0  # a terminal clock further than this from the host's is logged


@dataclass(frozen=True)
class SyncSettings:
    host_url: str
    host_public_key: bytes
    # the pinned root: these keys (default: host_public_key alone) and how many must sign a
    # root statement; with no statement yet they also sign the lists (agent.trust)
    root_keys: tuple[bytes, ...] = ()
    root_threshold: int = 1
    upload_interval_s: float = 30.0
    upload_threshold: int = 200
    batch_size: int = 500
    check_interval_s: float = 1.0
    blacklist_interval_s: float = 60.0
    params_interval_s: float = 300.0
    heartbeat_interval_s: float = 60.0
    compact_after_s: float | None = 86400.0
    timeout_s: float = 10.0
    retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    # a host's Retry-After is honoured up to this (a hostile or confused host cannot park the
    # terminal longer), plus up to ``retry_after_spread`` of itself as jitter (no herd)
    retry_after_max_s: float = 300.0
    retry_after_spread: float = 0.5
    tls: ClientTls | None = None
    # the one-time code an operator issued for this terminal (``--enrolment-code-file``); sent
    # only in the enrolment request, never logged or shown in a repr
    enrolment_code: str | None = field(default=None, repr=False)


@dataclass
class UploadReport:
    batches: int = 0
    records: int = 0
    ack_seq: int = 0
    quarantined: list[int] = field(default_factory=list)  # seqs sent as quarantine notices


@dataclass
class _JobState:
    failures: int = 0
    not_before: float = 0.0
    last_ok: float | None = None
    last_error: str | None = None


class Stopping(Exception):
    """The daemon is shutting down; the current job ends early (nothing is lost)."""


@dataclass
class SyncDaemon:
    """The jobs of one terminal; :meth:`run_forever` is ``cardsync run``."""

    settings: SyncSettings
    store: OfflineStore
    client: SyncClient
    blacklist: Blacklist
    params: ParamsFile
    device_public_key: bytes
    device_sign: Callable[[bytes], bytes]  # the device key's: proof of possession at enrolment
    root: RootFile | None = None
    # the printed-number list (agent.blacklist, its own key space); None: not pulled
    printed_blacklist: Blacklist | None = None
    flush_flag: Path | None = None
    checks_file: Path | None = None
    rng: random.Random = field(default_factory=random.Random)
    after_send_hook: Callable[[int], None] | None = None  # tests: "crash" between send and ack
    clock_offset_file: Path | None = None
    notifier: Notifier = field(default_factory=Notifier)
    _stop: threading.Event = field(default_factory=threading.Event)
    _flush: threading.Event = field(default_factory=threading.Event)
    _jobs: dict[str, _JobState] = field(default_factory=dict)
    _registered: bool = False
    # the data directory (device keys after a rotation: agent.wiring), None in bare tests
    data_dir: Path | None = None
    _registered_key: bytes = b""  # the device key the host accepted last (this process)
    _last_upload: float = field(default_factory=time.monotonic)
    _scheduler: BackgroundScheduler | None = None
    _started_at: float = field(default_factory=time.time)
    checks: dict[str, float] = field(default_factory=dict)  # list -> newest verified pull

    # --- the upload --------------------------------------------------------------------------

    def upload_pending(self, max_batches: int | None = None) -> UploadReport:
        """Send unacknowledged records batch by batch until none is left (or stopping).

        Raises a :class:`sync.errors.SyncError` when the host stays unreachable or refuses.
        """
        report = UploadReport(ack_seq=self.store.acknowledged_seq())
        after = report.ack_seq
        stalls = 0
        while max_batches is None or report.batches < max_batches:
            if self._stop.is_set():
                raise Stopping("upload stopped between batches")
            # Key rotation (agent.wiring.DataDir.open_store): the host verifies each record
            # under the one key it holds for this terminal, so a batch never spans a cut-over,
            # and the new key is enrolled only once every record the old one signed is
            # acknowledged (the host holds the old key until then).
            epochs = self.store.key_epochs()
            epoch = epochs.index(after + 1)
            self._ensure_registered(epochs.keys[epoch])
            end = epochs.firsts[epoch + 1] - 1 if epoch + 1 < len(epochs.firsts) else None
            records = self.store.unsent_entries(self.settings.batch_size, after_seq=after)
            if end is not None:
                records = [r for r in records if r.seq <= end]
            if not records:
                break
            for entry in records:
                if isinstance(entry, QuarantineNotice):
                    log.warning(
                        "quarantined record sent as a notice",
                        terminal_id=entry.terminal_id,
                        seq=entry.seq,
                        reason=entry.reason,
                    )
            if records[0].seq != after + 1:
                log.error(
                    "records the host needs were compacted away",
                    host_ack=after,
                    first_available=records[0].seq,
                )
            # signed by the key that signed these records (the one the host holds for them):
            # the host verifies this one signature and the chain
            signer = self._signer_for(epochs.keys[epoch])
            batch = encode_batch(self.store.terminal_id, records, sign=signer)
            last_seq = self.store.last_seq()
            ack = self._retrying("upload", functools.partial(self._upload, batch, last_seq))
            if self.after_send_hook is not None:
                self.after_send_hook(ack.ack_seq)
            stored = self.store.mark_acknowledged(ack.ack_seq)
            report.batches += 1
            report.records += batch.count
            report.quarantined += [
                e.seq for e in records if isinstance(e, QuarantineNotice) and e.seq <= stored
            ]
            report.ack_seq = stored
            log.info(
                "batch acknowledged",
                first_seq=batch.first_seq,
                last_seq=batch.last_seq,
                records=batch.count,
                ack_seq=ack.ack_seq,
                stored=ack.stored,
                duplicates=ack.duplicates,
                anomalies=ack.anomalies,
            )
            if ack.ack_seq >= batch.last_seq:
                after, stalls = ack.ack_seq, 0
                continue
            # The host holds less than this batch: resend from its acknowledgement.
            stalls += 1
            log.warning(
                "host acknowledged less than it was sent",
                ack_seq=ack.ack_seq,
                sent_through=batch.last_seq,
                stalls=stalls,
            )
            if stalls >= 3:
                raise ProtocolError(
                    f"host: acknowledgement stuck at {ack.ack_seq} after sending "
                    f"records {batch.first_seq}..{batch.last_seq} three times"
                )
            after = ack.ack_seq
        self._last_upload = time.monotonic()
        self._compact()
        return report

    @property
    def signing_keys(self) -> tuple[bytes, ...]:
        """The keys that sign lists and answers: the root in force's (agent.trust)."""
        if self.root is None:
            return (self.settings.host_public_key,)
        return self.root.current.signing_keys

    def _upload(self, batch: UploadBatch, last_seq: int) -> Ack:
        try:
            try:
                return self._send_batch(batch, last_seq)
            except UnknownSigner:
                # Signed by a key not in force: if the host's root statements name it (a
                # rotation not yet learnt), send the same batch again (idempotent).
                if not self._learn_root():
                    raise
                return self._send_batch(batch, last_seq)
        except ProtocolError as exc:
            # An unsigned, forged or inconsistent acknowledgement: nothing is marked or
            # compacted; the job backs off and the batch is sent again later.
            log.error(
                "acknowledgement refused; nothing marked",
                first_seq=batch.first_seq,
                last_seq=batch.last_seq,
                error=str(exc),
            )
            raise

    def _send_batch(self, batch: UploadBatch, last_seq: int) -> Ack:
        key = self.signing_keys
        try:
            return self.client.upload(batch, last_seq, key)
        except HostError as exc:
            if exc.code == "unknown_terminal":  # the host forgot us: register, then retry
                self._registered = False
                self._ensure_registered(self.store.key_epochs().key_for(batch.first_seq))
                return self.client.upload(batch, last_seq, key)
            raise

    def _learn_root(self) -> bool:
        """Fetch the host's newer root statements; True if the root in force changed."""
        try:
            return self.pull_root() > 0
        except (ListRejected, HostError, HostUnreachable) as exc:
            log.warning("root statements unavailable", error=str(exc))
            return False

    def _ensure_registered(self, public_key: bytes | None = None) -> None:
        """Enrol on first contact (with the operator's code, if configured); afterwards the
        host knows the key and answers the same request 200. ``public_key``: the device key
        that signs the next records to send (after a rotation, the new key once every record
        of the old one is acknowledged: the host's ``rotated``, then the old key is retired)."""
        epochs = self.store.key_epochs()
        # never a key whose records come later than the host's acknowledgement: enrolling the
        # new key early would make the host refuse the old key's records still to come
        wanted = public_key or epochs.key_for(self.store.acknowledged_seq() + 1)
        if self._registered and wanted == self._registered_key:
            return
        sign, code = self._signer_for(wanted), self.settings.enrolment_code
        if len(epochs.keys) > 1 and wanted == epochs.keys[-1]:
            # a rotation: the operator's new one-time code if the technician stored one (the
            # code of the first enrolment is used up), else none (a pre-registered key)
            fresh = self._rotation_code()
            code = fresh if fresh != self.settings.enrolment_code else None
        self._retrying("register", lambda: self.client.register(wanted, sign, code))
        self._registered, self._registered_key = True, wanted
        if wanted == epochs.keys[-1]:
            self._retire_old_keys(wanted)

    def _signer_for(self, public_key: bytes) -> Callable[[bytes], bytes]:
        """What signs for ``public_key``: the daemon's device key, or (across a rotation) the
        key file that holds it."""
        if public_key == self.device_public_key:
            return self.device_sign
        return self._device_key_file(public_key).sign

    def _device_key_file(self, public_key: bytes) -> DeviceKey:
        """The device key file holding ``public_key`` (device.key, or the old key kept
        during a rotation); a clear error when none does."""
        if self.data_dir is not None:
            for name in (DEVICE_KEY_FILE, OLD_DEVICE_KEY_FILE):
                path = self.data_dir / name
                if path.exists():
                    key = DeviceKey.load(path)
                    if key.public_key_bytes == public_key:
                        return key
        raise StoreError(
            f"store: no device key file holds key {key_id_for(public_key)}, which signs the "
            "next records to upload; they cannot be enrolled at the host"
        )

    def _rotation_code(self) -> str | None:
        """An operator's one-time code for the new key, if the technician stored one
        (DATA_DIR/enrolment.code, the console's 'provision code'); read when needed."""
        if self.data_dir is None:
            return None
        path = self.data_dir / ENROLMENT_CODE_FILE
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"store: {path} is unreadable: {exc}") from exc
        return text or None

    def _retire_old_keys(self, accepted: bytes) -> None:
        """The host accepted ``accepted`` and every record an older key signed is
        acknowledged (the upload enrols a key only then): the old private key goes."""
        if self.data_dir is None:
            return
        old = self.data_dir / OLD_DEVICE_KEY_FILE
        if old.exists() and DeviceKey.load(old).public_key_bytes != accepted:
            old.unlink()
            log.warning(
                "old device key retired: the host accepted the new key and acknowledged "
                "every record the old one signed",
                new_key_id=key_id_for(accepted),
            )

    def _compact(self) -> None:
        keep = self.settings.compact_after_s
        if keep is None:
            return
        cutoff = datetime.fromtimestamp(time.time() - keep, UTC)
        counted = self._cap_records_since()
        if counted is not None and counted < cutoff:
            cutoff = counted  # the fare caps' accumulators are these records: keep them
        self.store.compact(self.store.acknowledged_seq(), created_before=cutoff)

    def _cap_records_since(self) -> datetime | None:
        """The oldest record a daily or monthly cap of the parameter set in force counts
        (``agent.products.fare_policy.accumulator_since``); ``None`` without a cap."""
        current = self.params.current
        raw = None if current is None else current.payload.get("fare_policy")
        if raw is None:
            return None
        try:
            policy = parse_fare_policy(raw)
        except FarePolicyError as exc:  # verified when stored; a newer validator may differ
            log.error("fare policy in force unreadable; compaction keeps the month", error=str(exc))
            return datetime.now(UTC) - timedelta(days=31)
        return accumulator_since(policy, datetime.now(UTC))

    # --- lists -------------------------------------------------------------------------------

    def pull_root(self) -> int:
        """Fetch and accept the host's newer root statements; how many were accepted. Raises
        ListRejected for a statement the root in force did not sign, a rollback, a conflict."""
        root = self.root
        if root is None:
            return 0
        since = root.current.version
        statements = self._retrying("root", lambda: self.client.fetch_root(since))
        accepted = 0
        for statement in statements:
            try:
                accepted += root.update(statement)
            except RootRejected as exc:
                log.error("root statement refused", reason=str(exc), root_version=since)
                raise ListRejected(str(exc)) from exc
        self.params.keys = root.current.signing_keys
        return accepted

    def pull_blacklist(self) -> ApplyResult | None:
        """Fetch and apply the serial list. Raises ListRejected.

        The answer streams to a file beside the blacklist while it is checked and hashed
        (:class:`agent.blacklist.IncomingList`); it is verified and applied only once whole."""
        self.pull_root()
        return self._pull_list(self.blacklist, "blacklist")

    def pull_printed_blacklist(self) -> ApplyResult | None:
        """Fetch and apply the printed-number list (``None`` if this daemon keeps none): its
        own job, so a host that cannot serve it (an older host) or a refused answer never
        holds back the serial list. Raises ListRejected naming it."""
        if self.printed_blacklist is None:
            return None
        self.pull_root()
        return self._pull_list(self.printed_blacklist, "printed_blacklist")

    def _pull_list(self, listed: Blacklist, name: str) -> ApplyResult:
        since = listed.version
        try:
            try:
                result = self._apply_blacklist(listed, since)
            except BlacklistBaseMismatch:
                log.warning(f"{name} delta does not apply; asking for a snapshot", since=since)
                result = self._apply_blacklist(listed, 0)
        except BlacklistRejected as exc:
            log.error(f"{name} refused", reason=str(exc), loaded_version=listed.version)
            raise ListRejected(f"{name}: {exc}") from exc
        self._checked(name, listed.checked_at)
        return result

    def _apply_blacklist(self, listed: Blacklist, since: int) -> ApplyResult:
        incoming = self._retrying("blacklist", lambda: self._fetch_blacklist(listed, since))
        return listed.apply_incoming(incoming, self.signing_keys)

    def _fetch_blacklist(self, listed: Blacklist, since: int) -> IncomingList:
        """One attempt: the answer streamed into a fresh incoming file (removed on failure)."""
        incoming = listed.incoming()
        try:
            self.client.fetch_blacklist(since, incoming.feed, space=listed.space)
        except BaseException:
            incoming.discard()
            raise
        return incoming

    def pull_params(self) -> ParamSet | None:
        self.pull_root()
        since = self.params.version
        document = self._retrying("params", lambda: self.client.fetch_params(since))
        if document is None:
            return None
        try:
            applied = self.params.apply(document)
        except ListRejected as exc:
            log.error("parameter set refused", reason=str(exc), loaded_version=since)
            raise
        self._checked("params", self.params.checked_at)
        return applied

    def _checked(self, name: str, at: float | None) -> None:
        """Keep when ``name`` last verified (a small file, replaced atomically)."""
        if at is None:
            return
        self.checks[name] = at
        if self.checks_file is None:
            return
        try:
            write_atomically(self.checks_file, json.dumps(self.checks, sort_keys=True).encode())
        except BlacklistFileError as exc:
            log.warning("list check time not kept", error=str(exc))

    def health(self) -> dict[str, Any]:
        oldest = self.store.oldest_unsent_created_at()
        figures: dict[str, Any] = {
            "terminal_id": self.store.terminal_id,
            "last_seq": self.store.last_seq(),
            "acknowledged_seq": self.store.acknowledged_seq(),
            "unsent_records": self.store.count_unsent(),
            "quarantined_records": self.store.count_quarantined(),
            "oldest_unsent_age_s": None
            if oldest is None
            else round(time.time() - oldest.timestamp(), 1),
            "store_bytes": self.store.file_size(),
            "params_version": self.params.version,
            "params_expires_at": self.params.current.expires_at if self.params.current else None,
            "params_checked_at": self.params.checked_at,
            "root_version": self.root.current.version if self.root else 0,
            "lists_checked_at": dict(self.checks),
            "uptime_s": round(time.time() - self._started_at, 1),
            **self._clock_offset_figures(),
            "errors": {n: s.last_error for n, s in self._jobs.items() if s.last_error},
        }
        figures.update(self.blacklist.health())
        if self.printed_blacklist is not None:
            figures.update(self.printed_blacklist.health())
        return figures

    def _clock_offset_figures(self) -> dict[str, Any]:
        offset = self.client.clock_offset
        if offset is None:
            return {"clock_offset_s": None, "clock_offset_measured_at": None}
        return {
            "clock_offset_s": offset.offset_s,
            "clock_offset_measured_at": round(offset.measured_at, 1),
        }

    def send_heartbeat(self) -> dict[str, Any]:
        self._ensure_registered()
        figures = self.health()
        try:
            answer = self._retrying("heartbeat", lambda: self.client.heartbeat(figures))
        except HostError as exc:
            if exc.code != "unknown_terminal":
                raise
            self._registered = False  # the host forgot us: register again, next run reports
            raise
        self._keep_clock_offset()
        return answer

    def _keep_clock_offset(self) -> None:
        """Keep the last measured offset for ``cardsync status``; say it in the status line."""
        figures = self._clock_offset_figures()
        if figures["clock_offset_s"] is None:
            return
        offset = figures["clock_offset_s"]
        if abs(offset) > CLOCK_OFFSET_WARN_S:
            log.warning("clock_offset_from_host", offset_s=offset, warn_above_s=CLOCK_OFFSET_WARN_S)
        self.notifier.status(
            f"synced with {self.settings.host_url}; acknowledged #{self.store.acknowledged_seq()};"
            f" clock offset {offset:+.1f} s"
        )
        if self.clock_offset_file is None:
            return
        try:
            write_atomically(self.clock_offset_file, json.dumps(figures, sort_keys=True).encode())
        except BlacklistFileError as exc:
            log.warning("clock offset not kept", error=str(exc))

    # --- scheduling --------------------------------------------------------------------------

    def request_flush(self) -> None:
        """Upload everything now (what SIGUSR1 and the flag file do)."""
        self._flush.set()

    def upload_due(self) -> bool:
        if self._flush.is_set():
            return True
        if self.flush_flag is not None and self.flush_flag.exists():
            return True
        unsent = self.store.count_unsent()
        if unsent == 0:
            return False
        if unsent >= self.settings.upload_threshold:
            return True
        return time.monotonic() - self._last_upload >= self.settings.upload_interval_s

    def _upload_job(self) -> None:
        if not self.upload_due():
            return
        flushing = self._flush.is_set() or bool(self.flush_flag and self.flush_flag.exists())
        if self._job("upload", self.upload_pending, ignore_backoff=flushing) is not None:
            self._flush.clear()
            if self.flush_flag is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.flush_flag.unlink()

    def _job(self, name: str, work: Callable[[], T], *, ignore_backoff: bool = False) -> T | None:
        """Run one job unless it is backing off; log and schedule the backoff on failure."""
        state = self._jobs.setdefault(name, _JobState())
        if not ignore_backoff and time.monotonic() < state.not_before:
            return None
        try:
            result = work()
        except Stopping:
            log.info("job stopped for shutdown", job=name)
            return None
        except (AgentError, OSError) as exc:
            state.failures += 1
            delay = self._retry_delay(state.failures, exc)
            state.not_before = time.monotonic() + delay
            state.last_error = f"{getattr(exc, 'party', 'os')}: {exc}"
            log.warning(
                "job failed; backing off",
                job=name,
                party=getattr(exc, "party", "os"),
                error=str(exc),
                failures=state.failures,
                retry_in_s=round(delay, 2),
            )
            return None
        state.failures, state.not_before, state.last_error = 0, 0.0, None
        state.last_ok = time.time()
        return result

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with full jitter: uniform(0, min(max, base * 2^(n-1)))."""
        ceiling = min(
            self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (failures - 1)
        )
        return self.rng.uniform(0, ceiling)

    def _retry_delay(self, failures: int, exc: BaseException) -> float:
        """The backoff after ``failures`` failures, and never less than the host's
        ``Retry-After`` (:class:`HostBusy`), capped at ``retry_after_max_s``, plus a uniform
        jitter of up to ``retry_after_spread`` of it: a thousand terminals told the same
        delay come back spread over half as long again, not all in the same second."""
        asked = getattr(exc, "retry_after_s", None)
        return honour_retry_after(
            self._backoff(failures),
            asked if isinstance(asked, int | float) else None,
            self.settings,
            self.rng,
        )

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """Repeat a call the protocol makes safe to repeat, on link or transient host errors."""
        attempt = 0
        while True:
            try:
                return call()
            except _RETRYABLE as exc:
                attempt += 1
                if attempt > self.settings.retries or self._stop.is_set():
                    raise
                delay = self._retry_delay(attempt, exc)
                log.warning(
                    "call failed; retrying",
                    call=what,
                    party=exc.party,
                    error=str(exc),
                    attempt=attempt,
                    retry_in_s=round(delay, 3),
                )
                if self._stop.wait(delay):
                    raise

    def start(self) -> None:
        """Start the jobs in background threads (the demo helper; tests)."""
        s = self.settings
        # apscheduler warns on every tick that finds the upload still running (a long backlog);
        # that is expected here. Job errors (ERROR) still reach the log.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        logging.getLogger("apscheduler.executors").setLevel(logging.ERROR)
        scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
        )
        scheduler.add_job(self._upload_job, "interval", seconds=s.check_interval_s, id="upload")
        for name, interval, work in (
            ("blacklist", s.blacklist_interval_s, self.pull_blacklist),
            ("printed_blacklist", s.blacklist_interval_s, self.pull_printed_blacklist),
            ("params", s.params_interval_s, self.pull_params),
            ("heartbeat", s.heartbeat_interval_s, self.send_heartbeat),
        ):
            scheduler.add_job(
                self._job,
                "interval",
                seconds=interval,
                args=(name, work),
                id=name,
                next_run_time=_now_for_scheduler(),
            )
        watchdog = Watchdog(self.notifier)
        if watchdog.interval_s is not None:
            # the ping is a job: it runs only while the scheduler hands out work
            scheduler.add_job(
                watchdog.alive, "interval", seconds=watchdog.interval_s / 2, id="watchdog"
            )
            watchdog.alive()
        scheduler.start()
        self._scheduler = scheduler
        self.notifier.ready(f"syncing with {s.host_url}")
        log.info(
            "sync daemon started",
            host=s.host_url,
            terminal_id=self.store.terminal_id,
            blacklist_version=self.blacklist.version,
            acknowledged_seq=self.store.acknowledged_seq(),
        )

    def stop(self, *, wait: bool = True) -> None:
        """Stop the jobs: the upload ends after its in-flight batch; backoff sleeps end now."""
        self._stop.set()
        self.notifier.stopping()
        if self._scheduler is not None:
            with contextlib.suppress(Exception):
                self._scheduler.shutdown(wait=wait)
            self._scheduler = None
        log.info("sync daemon stopped", acknowledged_seq=self.store.acknowledged_seq())

    def run_forever(self) -> None:
        """``cardsync run``: jobs until SIGTERM/SIGINT; SIGUSR1 asks for a flush."""
        done = threading.Event()

        def on_term(signum: int, frame: FrameType | None) -> None:
            log.info("signal received; shutting down", signal=signal.Signals(signum).name)
            self._stop.set()
            done.set()

        def on_usr1(signum: int, frame: FrameType | None) -> None:
            log.info("flush requested", signal="SIGUSR1")
            self.request_flush()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGUSR1, on_usr1)
        self.start()
        try:
            while not done.wait(0.5):
                pass
        finally:
            self.stop(wait=True)
            self.close()

    def close(self) -> None:
        self.client.close()
        self.store.close()
        self.notifier.close()


def honour_retry_after(
    backoff_s: float, asked_s: float | None, settings: SyncSettings, rng: random.Random
) -> float:
    """The delay before the next attempt: ``backoff_s``, and never less than the host's
    ``Retry-After`` (``asked_s``) capped at ``settings.retry_after_max_s``, plus a uniform
    jitter of up to ``settings.retry_after_spread`` of it (the daemon's rule; the city bench's
    simulated terminals use it too)."""
    if asked_s is None or asked_s <= 0:
        return backoff_s
    honoured = min(float(asked_s), settings.retry_after_max_s)
    return max(backoff_s, honoured + rng.uniform(0, honoured * settings.retry_after_spread))


def _now_for_scheduler() -> datetime:
    return datetime.now().astimezone()


def open_daemon(data_dir: Path, settings: SyncSettings, **options: Any) -> SyncDaemon:
    """Open the agent's store, blacklist and parameters in ``data_dir`` and build the daemon."""
    data = DataDir(data_dir)
    # the host refuses any other id on every route: say so here, not at each call (the agent
    # itself keeps tapping with whatever id it was provisioned with: taps never wait on this)
    check_terminal_id(data.terminal_id())
    store = data.open_store()
    try:
        device_key = DeviceKey.load(data_dir / DEVICE_KEY_FILE)
        blacklist = _open_list(data_dir / BLACKLIST_FILE, SPACE_SERIAL)
        printed = _open_list(data_dir / PRINTED_BLACKLIST_FILE, SPACE_PRINTED)
        if (data_dir / UNSCOPED_PRINTED_FILE).exists():
            # issue 15: its keys name no issuer; the issuer-scoped list is pulled anew
            log.warning(
                "unscoped_printed_list_ignored",
                path=str(data_dir / UNSCOPED_PRINTED_FILE),
                detail="a printed-number list from before issuer scoping is never read; the "
                f"issuer-scoped list is pulled into {PRINTED_BLACKLIST_FILE}",
            )
        pinned = pinned_root(
            settings.root_keys or (settings.host_public_key,), settings.root_threshold
        )
        root = RootFile.open(data_dir / ROOT_FILE, pinned)
        # the chain the agent verifies params.json against (agent/params.py, agent/trust.py)
        root.save()
        write_host_key(data_dir, settings.host_public_key)
        params = ParamsFile(data_dir / PARAMS_FILE, root.current.signing_keys)
        client = SyncClient(
            settings.host_url, store.terminal_id, tls=settings.tls, timeout_s=settings.timeout_s
        )
    except (AgentError, OSError) as exc:
        store.close()
        if isinstance(exc, AgentError):
            raise
        raise StoreError(f"store: cannot open the sync daemon's files: {exc}") from exc
    return SyncDaemon(
        settings=settings,
        store=store,
        client=client,
        blacklist=blacklist,
        printed_blacklist=printed,
        params=params,
        device_public_key=device_key.public_key_bytes,
        device_sign=device_key.sign,
        data_dir=data_dir,
        root=root,
        flush_flag=data_dir / FLUSH_FLAG_FILE,
        checks_file=data_dir / CHECKS_FILE,
        checks=read_checks(data_dir / CHECKS_FILE),
        clock_offset_file=data_dir / CLOCK_OFFSET_FILE,
        **options,
    )


def _open_list(path: Path, space: str) -> Blacklist:
    """One of the agent's list files; the daemon looks no card up: it holds the list's header
    and offset table only. A corrupt file is replaced by the next snapshot."""
    try:
        return Blacklist.open(path, auto_refresh_s=None, lookups=False, space=space)
    except BlacklistFileError as exc:
        log.error(
            "local blacklist unusable; a fresh snapshot will replace it",
            path=str(path),
            error=str(exc),
        )
        return Blacklist(path, auto_refresh_s=None, lookups=False, space=space)


def read_clock_offset(path: Path) -> dict[str, Any]:
    """The kept clock offset figures (``None`` values if never measured or unreadable)."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        value = None
    if not isinstance(value, dict):
        value = {}
    return {
        key: value[key] if isinstance(value.get(key), int | float) else None
        for key in ("clock_offset_s", "clock_offset_measured_at")
    }


def read_checks(path: Path) -> dict[str, float]:
    """The kept list check times (none if the file is absent or unreadable)."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float)}
