"""Build the pieces a profile names: the reader driver, the SAM, the store, the engine."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigurationError, StoreError
from agent.offline_store import DeviceKey, OfflineStore
from agent.profile import Profile, ReaderProfile
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
from agent.sam.psam import PsamConfig, PsamDriver
from agent.sam.software import SamCore, SoftwareSam

DEVICE_KEY_FILE = "device.key"
TERMINAL_FILE = "terminal.json"
STORE_FILE = "agent.db"
SOFTWARE_SAM_TTC_FILE = "software-sam.ttc"


@dataclass(frozen=True, slots=True)
class DataDir:
    """The device's data directory: device key, terminal identity, offline store."""

    path: Path

    @property
    def store_path(self) -> Path:
        return self.path / STORE_FILE

    def provision(self, terminal_id: str) -> DeviceKey:
        """Create the device key and terminal identity. Refuses to overwrite either."""
        if not terminal_id or not terminal_id.isprintable() or len(terminal_id) > 32:
            raise ConfigurationError(f"terminal id {terminal_id!r} must be 1..32 printable chars")
        self.path.mkdir(parents=True, exist_ok=True)
        identity = self.path / TERMINAL_FILE
        if identity.exists():
            raise StoreError(f"store: {identity} exists: this device is already provisioned")
        key = DeviceKey.create(self.path / DEVICE_KEY_FILE)
        tmp = identity.with_suffix(".tmp")
        tmp.write_text(json.dumps({"terminal_id": terminal_id}), encoding="utf-8")
        os.replace(tmp, identity)
        return key

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

    def open_store(self) -> OfflineStore:
        terminal_id = self.terminal_id()
        key = DeviceKey.load(self.path / DEVICE_KEY_FILE)
        return OfflineStore.open(self.store_path, key, terminal_id)


@dataclass
class Hardware:
    """The reader and the SAM a profile names, ready for taps."""

    reader: CardReader
    sam: Sam

    def close(self) -> None:
        self.sam.close()
        self.reader.close()


def open_hardware(profile: Profile, data_dir: DataDir, reader_url: str | None = None) -> Hardware:
    """Open the reader driver and the SAM the profile names."""
    rp = profile.reader
    opener = _DRIVERS.get(rp.driver)
    if opener is None:
        raise ConfigurationError(f"{profile.source}: unknown reader driver {rp.driver!r}")
    reader, slot = opener(rp, reader_url, profile.sam_kind == "psam")
    try:
        sam = open_sam(profile, data_dir, slot)
    except BaseException:
        if slot is not None:
            slot.close()
        reader.close()
        raise
    return Hardware(reader, sam)


ReaderAndSlot = tuple[CardReader, SamSlot | None]


def _serial(rp: ReaderProfile, url: str | None, want_sam: bool) -> ReaderAndSlot:
    link = SerialModuleLink(
        url or rp.url,
        framing=Framing.from_mapping(rp.framing) if rp.framing else Framing(),
        baudrate=rp.baudrate,
        timeout=rp.timeout_s,
    )
    reader = SerialModuleReader(link, poll_interval=rp.poll_interval_s)
    return reader, SerialModuleSamSlot(link, rp.sam_slot) if want_sam else None


def _pcsc(rp: ReaderProfile, url: str | None, want_sam: bool) -> ReaderAndSlot:
    reader = PcscCardReader(url or rp.card_reader, timeout=rp.timeout_s)
    return reader, _pcsc_sam_slot(rp) if want_sam else None


def _nfcpy(rp: ReaderProfile, url: str | None, want_sam: bool) -> ReaderAndSlot:
    reader = NfcReader(url or rp.url, timeout=rp.timeout_s, poll_interval=rp.poll_interval_s)
    return reader, _pcsc_sam_slot(rp) if want_sam else None


def _pcsc_sam_slot(rp: ReaderProfile) -> SamSlot:
    return PcscSamSlot(rp.sam_reader, timeout=rp.timeout_s)


_DRIVERS: dict[str, Callable[[ReaderProfile, str | None, bool], ReaderAndSlot]] = {
    "serial": _serial,
    "pcsc": _pcsc,
    "nfcpy": _nfcpy,
}


def open_sam(profile: Profile, data_dir: DataDir, slot: SamSlot | None) -> Sam:
    if profile.sam_kind == "psam":
        if slot is None:
            raise ConfigurationError(f"{profile.source}: sam.kind 'psam' needs a SAM slot")
        driver = PsamDriver(slot, PsamConfig.for_application(profile.sam_application))
        driver.open()
        return driver
    return software_sam(profile, data_dir.path / SOFTWARE_SAM_TTC_FILE)


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
