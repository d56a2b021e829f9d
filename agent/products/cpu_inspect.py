"""Sans-I/O reading of everything public on a CPU purse card, for a technician (issue 15).

One step, :func:`inspect_card`: the purse application the profile lists first that the card
carries, its dialect, the purse balance, the negative purse where the dialect has one, the
EF18 transaction log and the trip records; nothing is written and no SAM is asked. The
balance shown follows the dialect's balance semantics
(:meth:`agent.profile.Dialect.display_balance`).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

from agent.apdu import Command, Response
from agent.errors import CardProtocolError, CardStatusError
from agent.products import cpu_logs, cpu_purse
from agent.products.cpu_purse import ApplicationNotFound, CpuCard
from agent.profile import ApplicationProfile, Dialect, Profile, TripLayout

Step = Generator[Command, Response, "CardReport"]


@dataclass(frozen=True, slots=True)
class CardReport:
    card: CpuCard
    dialect: Dialect
    negative_purse: int | None  # GET BALANCE P1 = dialect.negative_purse_p1; None: not read
    log: list[cpu_logs.LogEntry] = field(default_factory=list)
    trips: list[cpu_logs.Trip] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be read, and why

    @property
    def shown_balance(self) -> int:
        """The balance as the issuer shows it (scale, offset, negative purse)."""
        return self.dialect.display_balance(self.card.balance, self.negative_purse or 0)

    @property
    def trip_layout(self) -> TripLayout | None:
        return self.dialect.trips


def inspect_card(applications: Sequence[ApplicationProfile], dialects: Sequence[Dialect]) -> Step:
    """Select the first of ``applications`` the card carries and read it whole (read-only).

    A file the card refuses (the log, trips, negative purse) is a problem in the report, not a
    failure: a technician still sees the rest."""
    not_found: list[str] = []
    for app in applications:
        try:
            fci = yield from cpu_purse.select_application(app)
        except ApplicationNotFound as exc:
            not_found.append(str(exc))
            continue
        card = yield from cpu_purse.read_card(app, fci, dialects)
        dialect = next(d for d in dialects if d.name == card.dialect)
        problems: list[str] = []
        negative: int | None = None
        if dialect.negative_purse_p1:
            command = Command(
                0x80, 0x5C, dialect.negative_purse_p1, dialect.purse, le=0x04,
                name=f"GET BALANCE P1 {dialect.negative_purse_p1:02X}",
            )  # fmt: skip
            response = yield command
            if response.ok and len(response.data) == 4:
                negative = int.from_bytes(response.data, "big") & 0x7FFFFFFF
            else:
                problems.append(f"{command.label}: SW {response.sw:04X}")
        log: list[cpu_logs.LogEntry] = []
        try:
            records = yield from cpu_logs.read_transactions()
            log = cpu_logs.parse_log(records, dialect.log_time)
        except (CardProtocolError, CardStatusError) as exc:
            problems.append(f"transaction log: {exc}")
        trips: list[cpu_logs.Trip] = []
        if dialect.trips is not None:
            try:
                records = yield from cpu_logs.read_trips(dialect.trips)
                trips = cpu_logs.parse_trips(dialect.trips, records)
            except (CardProtocolError, CardStatusError) as exc:
                problems.append(f"trip records: {exc}")
        return CardReport(card, dialect, negative, log, trips, problems)
    raise ApplicationNotFound("; ".join(not_found) or "no application in the profile")


def profile_inspection(profile: Profile) -> Step:
    return inspect_card(profile.applications, profile.dialects)
