"""SAM routing: which PSAM (slot) and which PSAM application serve each card family and M1.

Real validators carry several PSAMs (a JT/T 978 PSAM, a local CJ/T 166 PSAM, an M1 key PSAM) or
one PSAM with several applications (cpu-purse.md §4.1). The engine asks, per tap,
``router.sam_for(route)`` where ``route`` is a card family value (``tunion``, ``cjt166``,
``legacy1001``) or ``m1``, and gets a :class:`agent.sam.base.Sam` whose PSAM application is the
one that route needs:

* one :class:`PsamDriver` per slot; an application is re-selected (SELECT by AID/FID) only when the
  PSAM's current selection is not the one needed. EF15/EF16 (serial, terminal number) live in the
  PSAM's MF and are read once per open; EF17 (purchase-key index) is read per application.
* a slot that could not be opened at start, or went mute, makes *its* routes raise
  :class:`SamUnavailable` (naming slot and route) while the other routes keep working; it is
  re-opened on a later tap, at most once per ``retry_interval_s``.

:class:`SingleSamRouter` serves every route with one :class:`Sam` (the software SAM, old tests).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from agent.errors import ReaderError, SamError, SamMuteError, SamUnavailable
from agent.sam.base import PurchaseMac, PurchaseMacRequest, Sam
from agent.sam.psam import ApplicationPath, PsamDriver, describe_path

log = structlog.get_logger(__name__)

ROUTES = ("tunion", "cjt166", "legacy1001", "m1")
"""Route names: the CPU card families (:class:`agent.profile.Family` values) and ``m1``."""

DEFAULT_RETRY_INTERVAL_S = 2.0


@dataclass(frozen=True, slots=True)
class SamSlotStatus:
    """One SAM slot as a status command shows it (no APDU is sent to build it)."""

    name: str
    location: str  # the slot's driver name (serial module slot n, PC/SC reader, ...)
    open: bool
    serial: str | None  # PSAM EF15 serial, hex
    terminal: str | None  # PSAM EF16 terminal number, hex
    application: str | None  # the application currently selected
    routes: tuple[str, ...]
    error: str = ""  # why it is not open
    applications: tuple[str, ...] = ()  # the PSAM applications its routes use (profile order)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "location": self.location,
            "open": self.open,
            "serial": self.serial,
            "terminal": self.terminal,
            "application": self.application,
            "routes": list(self.routes),
            "applications": list(self.applications),
            "error": self.error,
        }


class SamRouter(abc.ABC):
    """Gives the engine the SAM (slot + PSAM application) each route needs."""

    @abc.abstractmethod
    def sam_for(self, route: str) -> Sam:
        """The SAM for ``route`` with its application selected; raises :class:`SamUnavailable`
        when that route's SAM is missing, mute, or lacks the application."""

    @abc.abstractmethod
    def describe(self) -> list[SamSlotStatus]:
        """Per slot: name, serial, terminal number, open or not."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def routes(self) -> tuple[str, ...]:
        """The routes served, first the default one (see :meth:`primary`)."""

    def primary(self) -> Sam:
        """The SAM of the first route, for callers that know only one SAM."""
        return self.sam_for(self.routes[0])


class SingleSamRouter(SamRouter):
    """Every route goes to one SAM (the software SAM, or a single-application PSAM)."""

    def __init__(self, sam: Sam, *, name: str = "sam") -> None:
        self.sam = sam
        self.name = name

    @property
    def routes(self) -> tuple[str, ...]:
        return ROUTES

    def sam_for(self, route: str) -> Sam:
        return self.sam

    def describe(self) -> list[SamSlotStatus]:
        serial: str | None
        terminal: str | None
        if isinstance(self.sam, PsamDriver):
            serial, terminal = self.sam.known_identity
            is_open = self.sam.is_open
            location = self.sam.slot.name
        else:
            serial, terminal = self.sam.serial, self.sam.terminal_number.hex().upper()
            is_open, location = True, type(self.sam).__name__
        return [SamSlotStatus(self.name, location, is_open, serial, terminal, None, ROUTES)]

    def close(self) -> None:
        self.sam.close()


@dataclass(frozen=True, slots=True)
class PsamRoute:
    """Where one route goes: a slot name and the PSAM application's selection path."""

    slot: str
    application: ApplicationPath
    label: str = ""  # e.g. the profile's preset name; defaults to the path

    @property
    def name(self) -> str:
        return self.label or describe_path(self.application)


class _Slot:
    def __init__(self, name: str, driver: PsamDriver) -> None:
        self.name = name
        self.driver = driver
        self.failed_at: float | None = None
        self.error = "not opened yet"


class PsamRouter(SamRouter):
    """Routes over PSAMs in several slots, each possibly holding several applications.

    ``slots``: slot name -> driver (in profile order). ``routes``: route -> :class:`PsamRoute`
    (in profile order; the first is the default). Call :meth:`open` once at start: it tries
    every slot and never raises for a missing one.
    """

    def __init__(
        self,
        slots: Mapping[str, PsamDriver],
        routes: Mapping[str, PsamRoute],
        *,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not routes:
            raise ValueError("a SAM router needs at least one route")
        unknown = sorted({r.slot for r in routes.values()} - set(slots))
        if unknown:
            raise ValueError(f"routes name unknown SAM slots: {', '.join(unknown)}")
        self._slots = {name: _Slot(name, driver) for name, driver in slots.items()}
        self._routes = dict(routes)
        self.retry_interval_s = retry_interval_s
        self.clock = clock

    @property
    def routes(self) -> tuple[str, ...]:
        return tuple(self._routes)

    def primary(self) -> PsamDriver:
        """The PSAM driver of the first route's slot, without any APDU (it may still be
        missing); it keeps whatever application the last route selected."""
        return self._slots[self._routes[self.routes[0]].slot].driver

    def route(self, route: str) -> PsamRoute | None:
        return self._routes.get(route)

    def driver(self, slot: str) -> PsamDriver:
        return self._slots[slot].driver

    # -- opening ----------------------------------------------------------------------------

    def open(self) -> list[str]:
        """Try to open every slot; returns the names of those that opened. A slot that fails
        is logged and re-tried by a later :meth:`sam_for`."""
        opened = []
        for slot in self._slots.values():
            try:
                self._open(slot)
            except (SamError, ReaderError):
                continue
            opened.append(slot.name)
        return opened

    def _open(self, slot: _Slot) -> None:
        try:
            slot.driver.open()
        except (SamError, ReaderError) as exc:
            slot.failed_at = self.clock()
            slot.error = str(exc)
            log.warning("sam_slot_unavailable", slot=slot.name, error=slot.error)
            raise
        slot.failed_at, slot.error = None, ""
        serial, terminal = slot.driver.known_identity
        log.info("sam_slot_opened", slot=slot.name, serial=serial, terminal=terminal)

    # -- routing ----------------------------------------------------------------------------

    def sam_for(self, route: str) -> Sam:
        target = self._routes.get(route)
        if target is None:
            raise SamUnavailable("-", route, "the profile routes it to no SAM")
        slot = self._slots[target.slot]
        self._ensure_open(slot, route)
        self._select(slot, route, target)
        return RoutedPsam(slot.driver, route, target)

    def _ensure_open(self, slot: _Slot, route: str) -> None:
        if slot.driver.is_open:
            return
        if slot.failed_at is not None:
            wait = slot.failed_at + self.retry_interval_s - self.clock()
            if wait > 0:
                raise SamUnavailable(slot.name, route, f"{slot.error} (next retry in {wait:.1f} s)")
        try:
            self._open(slot)
        except (SamError, ReaderError) as exc:
            raise SamUnavailable(slot.name, route, str(exc)) from exc

    def _select(self, slot: _Slot, route: str, target: PsamRoute) -> None:
        try:
            slot.driver.select_application(target.application)
        except (SamMuteError, ReaderError) as exc:
            # A PSAM lost mid-tap is re-opened at once by the driver; failing that, it waits.
            slot.failed_at, slot.error = self.clock(), str(exc)
            log.warning("sam_slot_lost", slot=slot.name, route=route, error=slot.error)
            raise SamUnavailable(slot.name, route, str(exc)) from exc
        except SamError as exc:  # refused or malformed: this PSAM lacks the application
            raise SamUnavailable(
                slot.name, route, f"application {target.name} not selectable: {exc}"
            ) from exc

    # -- status -----------------------------------------------------------------------------

    def describe(self) -> list[SamSlotStatus]:
        out = []
        for slot in self._slots.values():
            driver = slot.driver
            serial, terminal = driver.known_identity
            current = driver.current_application
            application = None
            if current is not None:
                names = [r.name for r in self._routes.values() if r.application == current]
                application = names[0] if names else describe_path(current)
            out.append(
                SamSlotStatus(
                    name=slot.name,
                    location=driver.slot.name,
                    open=driver.is_open,
                    serial=serial,
                    terminal=terminal,
                    application=application,
                    routes=tuple(r for r, t in self._routes.items() if t.slot == slot.name),
                    error="" if driver.is_open else slot.error,
                    applications=tuple(
                        dict.fromkeys(t.name for t in self._routes.values() if t.slot == slot.name)
                    ),
                )
            )
        return out

    def close(self) -> None:
        for slot in self._slots.values():
            try:
                slot.driver.close()
            except (SamError, ReaderError) as exc:
                log.warning("sam_slot_close_failed", slot=slot.name, error=str(exc))


class RoutedPsam:
    """The :class:`Sam` of one route: a PSAM driver with that route's application selected
    before every operation (no APDU while it still is)."""

    def __init__(self, driver: PsamDriver, route: str, target: PsamRoute) -> None:
        self.driver = driver
        self.route = route
        self.target = target

    def __repr__(self) -> str:
        return (
            f"RoutedPsam(route={self.route!r}, slot={self.target.slot!r}, app={self.target.name})"
        )

    @property
    def slot_name(self) -> str:
        return self.target.slot

    def _selected(self) -> PsamDriver:
        """The driver, with this route's application selected (a lost PSAM is re-opened by
        the driver first, as for any command)."""
        self.driver.select_application(self.target.application)
        return self.driver

    @property
    def terminal_number(self) -> bytes:
        return self._selected().terminal_number

    @property
    def serial(self) -> str:
        return self._selected().serial

    @property
    def purchase_key_index(self) -> int:
        return self._selected().purchase_key_index

    def init_for_purchase(self, request: PurchaseMacRequest) -> PurchaseMac:
        return self._selected().init_for_purchase(request)

    def credit_for_purchase(self, mac2: bytes) -> None:
        self._selected().credit_for_purchase(mac2)

    def verify_security_code(self, code: bytes) -> None:
        self._selected().verify_security_code(code)

    def cipher_init(self, p1: int, p2: int, factors: Sequence[bytes]) -> None:
        self._selected().cipher_init(p1, p2, factors)

    def cipher_mac(self, data: bytes) -> bytes:
        return self._selected().cipher_mac(data)

    def calculate_m1_keys(self, data: bytes, *, p1: int = 0x01, p2: int = 0x01) -> bytes:
        return self._selected().calculate_m1_keys(data, p1=p1, p2=p2)

    def close(self) -> None:
        """The router owns the slot: closing one route's view closes nothing."""
