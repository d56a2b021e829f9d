"""Build the pieces a profile names: the reader driver, the SAMs (a router), the store."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigurationError, SamError, StoreError
from agent.offline_store import DeviceKey, OfflineStore
from agent.profile import (
    SAM_ROUTES,
    Profile,
    ReaderProfile,
    SamRouteProfile,
    SamSlotProfile,
)
from agent.readers.base import CardReader, SamSlot
from agent.readers.nfc import NfcReader
from agent.readers.pcsc import PcscCardReader, PcscSamSlot
from agent.readers.serial_module import (
    Framing,
    SerialModuleLink,
    SerialModuleReader,
    SerialModuleSamSlot,
)
from agent.sam.base import Sam
from agent.sam.keys import KeySet
from agent.sam.psam import ApplicationPath, PsamConfig, PsamDriver, application_path
from agent.sam.router import PsamRoute, PsamRouter, SamRouter, SingleSamRouter
from agent.sam.software import SamCore, SoftwareSam
from agent.terminal_id import check_terminal_id

DEVICE_KEY_FILE = "device.key"
# Device key rotation (cardagent keys rotate): the new key waits in NEXT_DEVICE_KEY_FILE until
# the agent's next start cuts over to it (open_store(cut_over=True)); the old key is then kept
# in OLD_DEVICE_KEY_FILE until the sync daemon has had every record it signed acknowledged and
# the host has accepted the new key (sync.daemon retires it).
NEXT_DEVICE_KEY_FILE = "device.key.next"
OLD_DEVICE_KEY_FILE = "device.key.old"
ENROLMENT_CODE_FILE = "enrolment.code"  # an operator's one-time code (console 'provision code')
TERMINAL_FILE = "terminal.json"
STORE_FILE = "agent.db"
SOFTWARE_SAM_TTC_FILE = "software-sam.ttc"
DATA_DIR_MODE = 0o750  # provisioning creates the data directory so; others may never write it
TERMINAL_FILE_MODE = 0o644


@dataclass(frozen=True, slots=True)
class DataDir:
    """The device's data directory: device key, terminal identity, offline store."""

    path: Path

    @property
    def store_path(self) -> Path:
        return self.path / STORE_FILE

    def provision(self, terminal_id: str) -> DeviceKey:
        """Create the device key and terminal identity. Refuses to overwrite either."""
        # one rule on both sides (agent.terminal_id): the host refuses any other id, so an id
        # like "BUS/12" or a lookalike must be refused here, before the device is in service
        check_terminal_id(terminal_id)
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(mode=DATA_DIR_MODE)
            os.chmod(self.path, DATA_DIR_MODE)  # whatever the umask
        self.check_permissions()
        identity = self.path / TERMINAL_FILE
        if identity.exists():
            raise StoreError(f"store: {identity} exists: this device is already provisioned")
        key = DeviceKey.create(self.path / DEVICE_KEY_FILE)
        tmp = identity.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, TERMINAL_FILE_MODE)
        try:
            os.fchmod(fd, TERMINAL_FILE_MODE)
            os.write(fd, json.dumps({"terminal_id": terminal_id}).encode("utf-8"))
        finally:
            os.close(fd)
        os.replace(tmp, identity)
        return key

    def check_permissions(self) -> None:
        """Refuse a data directory that other users can write (``mode & 0o022``): they could
        replace the store, the blacklist, the parameter set or the pinned host key."""
        try:
            st = self.path.stat()
        except FileNotFoundError as exc:
            raise ConfigurationError(f"data directory {self.path} does not exist") from exc
        except OSError as exc:
            raise ConfigurationError(f"data directory {self.path}: {exc.strerror}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigurationError(f"data directory {self.path} is not a directory")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise ConfigurationError(
                f"data directory {self.path} has mode {mode:04o}: other users can write it; "
                f"refusing to use it (chmod go-w {self.path})"
            )

    def terminal_id(self) -> str:
        identity = self.path / TERMINAL_FILE
        try:
            data = json.loads(identity.read_text(encoding="utf-8"))
            terminal_id = data["terminal_id"]
        except FileNotFoundError as exc:
            raise ConfigurationError(
                f"{self.path} is not provisioned: run 'cardagent provision --data-dir {self.path} "
                "--terminal-id ID' first"
            ) from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"store: {identity} is corrupt: {exc}") from exc
        if not isinstance(terminal_id, str):
            raise StoreError(f"store: {identity} has no terminal id")
        return terminal_id

    def open_store(self, *, cut_over: bool = False) -> OfflineStore:
        """Open the offline store with the device key; refuses an unsafe directory or key.

        Every stored record is verified once here: one that does not (a corrupted row) is
        quarantined and named in an error log, and the agent goes on taking cards.

        ``cut_over`` (the agent, the process that signs taps, at start): a new key waiting in
        :data:`NEXT_DEVICE_KEY_FILE` becomes the signing key from the next record on
        (:meth:`OfflineStore.rotate_key`, one transaction), then the files move: the current
        key to :data:`OLD_DEVICE_KEY_FILE` (kept for the sync daemon), the new one to
        ``device.key``. A crash between the steps is finished at the next start."""
        terminal_id = self.terminal_id()
        self.check_permissions()
        if cut_over:
            self._finish_key_files()
        key = DeviceKey.load(self.path / DEVICE_KEY_FILE)
        store = OfflineStore.open(self.store_path, key, terminal_id)
        try:
            store.quarantine_scan()
            if cut_over and (self.path / NEXT_DEVICE_KEY_FILE).exists():
                store.rotate_key(DeviceKey.load(self.path / NEXT_DEVICE_KEY_FILE))
                self._move_key_files()
        except BaseException:
            store.close()
            raise
        return store

    def create_next_key(self) -> DeviceKey:
        """``cardagent keys rotate``: a new device key beside the current one, in force from
        the agent's next start. Refuses while a rotation is under way."""
        self.check_permissions()
        self.terminal_id()  # provisioned
        pending = self.path / NEXT_DEVICE_KEY_FILE
        if pending.exists():
            raise StoreError(
                f"store: a new device key ({DeviceKey.load(pending).key_id}) already waits in "
                f"{pending} for the agent's restart"
            )
        old = self.path / OLD_DEVICE_KEY_FILE
        if old.exists():
            raise StoreError(
                f"store: the previous rotation is not finished: {old} is kept until the host "
                "has accepted the new key and acknowledged every record the old one signed "
                "(cardsync does it)"
            )
        return DeviceKey.create(pending)

    def _move_key_files(self) -> None:
        os.replace(self.path / DEVICE_KEY_FILE, self.path / OLD_DEVICE_KEY_FILE)
        os.replace(self.path / NEXT_DEVICE_KEY_FILE, self.path / DEVICE_KEY_FILE)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _finish_key_files(self) -> None:
        """A cut-over cut short: the store signs with the new key already (its meta says so)
        but the files did not move, or only the first did."""
        current, pending = self.path / DEVICE_KEY_FILE, self.path / NEXT_DEVICE_KEY_FILE
        if not pending.exists():
            return
        if not current.exists():  # crashed between the two renames
            os.replace(pending, current)
            return
        if not self.store_path.exists():
            return
        with OfflineStore.open_for_reading(self.store_path) as store:
            signing = store.key_epochs().keys[-1]
        if signing == DeviceKey.load(pending).public_key_bytes:
            self._move_key_files()


@dataclass
class Hardware:
    """The reader and the SAMs a profile names, ready for taps."""

    reader: CardReader
    sams: SamRouter

    @property
    def sam(self) -> Sam:
        """The first (or only) SAM: the PSAM driver of the first route's slot, or the software
        SAM, for callers that know only one SAM (the engine takes :attr:`sams`, per tap)."""
        return self.sams.primary()

    def close(self) -> None:
        self.sams.close()
        self.reader.close()


SlotFactory = Callable[[SamSlotProfile], SamSlot]


def open_hardware(profile: Profile, data_dir: DataDir, reader_url: str | None = None) -> Hardware:
    """Open the reader driver and every SAM slot the profile names.

    A PSAM slot that cannot be opened is left to its router, which refuses its routes
    (:class:`agent.errors.SamUnavailable`) and re-opens it later; only when no slot opens at all
    does this raise (the runner then retries the whole hardware)."""
    rp = profile.reader
    opener = _DRIVERS.get(rp.driver)
    if opener is None:
        raise ConfigurationError(f"{profile.source}: unknown reader driver {rp.driver!r}")
    reader, make_slot = opener(rp, reader_url)
    try:
        sams = open_sams(profile, data_dir, make_slot)
    except BaseException:
        reader.close()
        raise
    return Hardware(reader, sams)


ReaderAndSlots = tuple[CardReader, SlotFactory]


def _serial(rp: ReaderProfile, url: str | None) -> ReaderAndSlots:
    link = SerialModuleLink(
        url or rp.url,
        framing=Framing.from_mapping(rp.framing) if rp.framing else Framing(),
        baudrate=rp.baudrate,
        timeout=rp.timeout_s,
    )
    reader = SerialModuleReader(link, poll_interval=rp.poll_interval_s)

    def make_slot(slot: SamSlotProfile) -> SamSlot:
        return SerialModuleSamSlot(link, rp.sam_slot if slot.slot is None else slot.slot)

    return reader, make_slot


def _pcsc(rp: ReaderProfile, url: str | None) -> ReaderAndSlots:
    reader = PcscCardReader(url or rp.card_reader, timeout=rp.timeout_s)
    return reader, _pcsc_sam_slots(rp)


def _nfcpy(rp: ReaderProfile, url: str | None) -> ReaderAndSlots:
    reader = NfcReader(url or rp.url, timeout=rp.timeout_s, poll_interval=rp.poll_interval_s)
    return reader, _pcsc_sam_slots(rp)


def _pcsc_sam_slots(rp: ReaderProfile) -> SlotFactory:
    def make_slot(slot: SamSlotProfile) -> SamSlot:
        return PcscSamSlot(slot.reader or rp.sam_reader, timeout=rp.timeout_s)

    return make_slot


_DRIVERS: dict[str, Callable[[ReaderProfile, str | None], ReaderAndSlots]] = {
    "serial": _serial,
    "pcsc": _pcsc,
    "nfcpy": _nfcpy,
}


def sam_layout(profile: Profile) -> tuple[tuple[SamSlotProfile, ...], tuple[SamRouteProfile, ...]]:
    """The profile's SAM slots and routes; a profile built without them (by hand) gets the old
    shape: one slot where ``[reader]`` says, its ``sam_application`` serving every route."""
    if profile.sam_routes:
        return profile.sam_slots, profile.sam_routes
    rp = profile.reader
    slot = SamSlotProfile(
        "psam",
        slot=rp.sam_slot if rp.driver == "serial" else None,
        reader=rp.sam_reader if rp.driver != "serial" else "",
    )
    return (slot,), (SamRouteProfile(SAM_ROUTES, "psam", application=profile.sam_application),)


def route_path(route: SamRouteProfile) -> ApplicationPath:
    return application_path(route.application, aid=route.aid, fid=route.fid)


def open_sams(profile: Profile, data_dir: DataDir, make_slot: SlotFactory | None) -> SamRouter:
    """A router over the profile's PSAM slots (each opened if it can be), or the software SAM."""
    if profile.sam_kind != "psam":
        return SingleSamRouter(
            software_sam(profile, data_dir.path / SOFTWARE_SAM_TTC_FILE), name="software"
        )
    if make_slot is None:
        raise ConfigurationError(f"{profile.source}: sam.kind 'psam' needs a SAM slot")
    slots, routes = sam_layout(profile)
    drivers: dict[str, PsamDriver] = {}
    try:
        for slot in slots:
            first = next(r for r in routes if r.slot == slot.name)
            config = PsamConfig(application=route_path(first))
            drivers[slot.name] = PsamDriver(make_slot(slot), config)
        router = PsamRouter(
            drivers,
            {
                family: PsamRoute(route.slot, route_path(route), route.label)
                for route in routes
                for family in route.families
            },
            retry_interval_s=profile.sam_retry_interval_s,
        )
        if not router.open():
            errors = "; ".join(f"{s.name}: {s.error}" for s in router.describe())
            raise SamError(f"no PSAM could be opened ({errors})")
    except BaseException:
        for driver in drivers.values():
            driver.close()
        raise
    return router


def software_sam(profile: Profile, ttc_file: Path) -> SoftwareSam:
    """A SAM in software from the profile's test keys, its TTC kept in ``ttc_file``."""
    if not profile.test_keys:
        raise ConfigurationError(f"{profile.source}: the software SAM needs test_keys")
    try:
        ttc = int(ttc_file.read_text(encoding="ascii")) if ttc_file.exists() else 0
    except (OSError, ValueError) as exc:
        raise StoreError(f"store: {ttc_file} is corrupt: {exc}") from exc

    def persist(value: int) -> None:
        tmp = ttc_file.with_suffix(".tmp")
        tmp.write_text(str(value), encoding="ascii")
        os.replace(tmp, ttc_file)

    core = SamCore(
        KeySet.from_mapping(profile.test_keys),
        bytes.fromhex("000000000024"),
        bytes.fromhex("00000000000000000024"),
        ttc=ttc,
        on_ttc_change=persist,
        apdu_order_card_first=profile.factor_order_card_first,
        sm4_session_key=profile.sm4_session_key,
    )
    return SoftwareSam.for_profile(profile.kind.value, core)


def open_card_reader(profile: Profile, reader_url: str | None = None) -> CardReader:
    """Only the profile's contactless reader (no SAM): what ``cardagent card read`` needs."""
    opener = _DRIVERS.get(profile.reader.driver)
    if opener is None:
        raise ConfigurationError(
            f"{profile.source}: unknown reader driver {profile.reader.driver!r}"
        )
    reader, _slots = opener(profile.reader, reader_url)
    return reader
