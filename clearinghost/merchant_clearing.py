"""The merchant register and daily clearing at the host (issue 11): storage, the host key and
the clock around the pure arithmetic of :mod:`clearinghost.settlement`, and their routes.

Routes (operator-authenticated, see ``clearinghost/openapi.json``)::

    GET  /v1/admin/merchants                  viewer    the register
    POST /v1/admin/merchants                  operator  {"csv": "..."}: load (add or replace)
    GET  /v1/admin/merchant-terminals         viewer    which terminal is bound to which merchant
    POST /v1/admin/merchant-terminals         operator  {"csv": "terminal_id,merchant_id ..."}:
                                                        bind (or move) terminals
    GET  /v1/admin/clearing                   viewer    cleared days, newest first
    POST /v1/admin/clearing/{day}             operator  clear the day (a new version if the
                                                        figures changed, else the last one)
    GET  /v1/admin/clearing/{day}             viewer    figures, version, signature (?version=N)
    GET  /v1/admin/clearing/{day}/file        viewer    the signed settlement CSV (?version=N)
    POST /v1/admin/unresolved/{terminal_id}/{seq}/resolve
                                              operator  {"outcome": "paid" | "void"}: settle an
                                                        unresolved record (re-clear its day)

A day is cleared only once it is over in the city's time zone (409 ``day_not_over``).
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.terminal_id import terminal_id_problem
from clearinghost.keys import HostKey
from clearinghost.operators import OPERATOR, VIEWER
from clearinghost.settlement import (
    RESOLUTIONS,
    FeeSchedule,
    Settlement,
    SettlementError,
    business_day,
    city_zone,
    day_bounds,
    parse_bindings,
    parse_day,
    parse_register,
    settle_tally,
    settlement_csv,
    settlement_view,
    signed_message,
)
from clearinghost.storage import PendingChangeRefused, Storage, StorageFailure
from sync.protocol import error_body

log = structlog.get_logger(__name__)

MAX_REGISTER_BYTES = 4 * 1024 * 1024
UNBOUND_ANOMALY = "merchant_not_bound"
SIGNATURE_HEADER = "X-Settlement-Signature"
VERSION_HEADER = "X-Settlement-Version"
KEY_HEADER = "X-Host-Key"


class ClearingRefused(Exception):
    """A clearing request answered 4xx: ``status``, ``code``, ``detail``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _figures(view: dict[str, Any]) -> Any:
    """What decides whether a re-run changed anything (not the version or what was paid)."""
    keep = ("merchant_id", "count", "purchases", "rate_bp", "fee", "commission", "net")
    return (
        [{k: m[k] for k in keep} for m in view["merchants"]],
        view["apart"],
    )


@dataclass
class MerchantClearing:
    storage: Storage
    key: HostKey
    fees: FeeSchedule
    time_zone: str
    clock: Callable[[], float]

    def load_register(self, csv_text: str, by: str) -> dict[str, int]:
        try:
            merchants = parse_register(csv_text)
        except SettlementError as exc:
            raise ClearingRefused(422, "bad_register", str(exc)) from None
        added, updated = self.storage.load_merchants(merchants, by)
        return {"added": added, "updated": updated}

    def register(self) -> list[dict[str, str]]:
        return [
            {
                "merchant_id": m.merchant_id,
                "name": m.name,
                "category": m.category,
                "settlement_account": m.settlement_account,
            }
            for m in self.storage.merchants()
        ]

    def clear(self, day_text: str, by: str) -> tuple[bool, dict[str, Any]]:
        """Clear ``day``: ``(True, answer)`` for a new version, ``(False, answer)`` when the
        figures are those of the last version (nothing stored)."""
        day = self._day(day_text)
        zone = city_zone(self.time_zone)
        today = datetime.fromtimestamp(self.clock(), UTC).astimezone(zone).date()
        if day >= today:
            raise ClearingRefused(
                409, "day_not_over", f"{day} is not over yet in {self.time_zone} (today {today})"
            )
        register, bindings, tally = self.storage.day_tally(*day_bounds(day, zone))
        previous = self.storage.latest_settlement(day.isoformat())
        version = 1 if previous is None else int(previous["version"]) + 1
        paid = {} if previous is None else _nets(previous["view"])
        settlement = settle_tally(
            day, tally, register, self.fees, version=version, paid_before=paid
        )
        self._flag_unbound(settlement, bindings)
        view = settlement_view(settlement)
        if previous is not None and _figures(previous["view"]) == _figures(view):
            return False, self._answer(day.isoformat(), previous)
        content = settlement_csv(settlement)
        signature = self.key.sign(signed_message(content)).hex()
        try:
            self.storage.save_settlement(
                day.isoformat(), version, content.decode("utf-8"), signature, view, by
            )
        except StorageFailure:
            raise ClearingRefused(
                409, "clearing_conflict", f"{day} version {version} was stored by another run"
            ) from None
        stored = self.storage.settlement(day.isoformat(), version)
        assert stored is not None
        return True, self._answer(day.isoformat(), stored)

    def _flag_unbound(self, settlement: Settlement, bindings: dict[str, str]) -> None:
        """Each record naming a merchant its terminal is not bound to is an anomaly (once)."""
        items = []
        for a in settlement.apart:
            if a.line == "unbound":
                bound = bindings.get(a.terminal_id)
                where = f"bound to {bound}" if bound else "bound to no merchant"
                items.append(
                    (
                        a.terminal_id,
                        a.seq,
                        f"record {a.terminal_id}/{a.seq} names merchant {a.merchant_id!r} but "
                        f"the terminal is {where}: kept, not paid to {a.merchant_id!r}",
                    )
                )
        if items:
            added = self.storage.flag_records(UNBOUND_ANOMALY, items)
            log.warning("unbound records", day=settlement.day.isoformat(), new=added)

    def bind_terminals(self, csv_text: str, by: str) -> dict[str, int]:
        """Bind terminals to merchants from ``terminal_id,merchant_id`` lines: every bad line
        is named, nothing is half-bound; the merchant must be in the register."""
        try:
            pairs = parse_bindings(csv_text)
        except SettlementError as exc:
            raise ClearingRefused(422, "bad_bindings", str(exc)) from None
        known = {m.merchant_id for m in self.storage.merchants()}
        unknown = [
            f"line {n}: merchant {mid!r} is not in the register"
            for n, (_tid, mid) in enumerate(pairs, start=2)
            if mid not in known
        ]
        if unknown:
            raise ClearingRefused(422, "bad_bindings", "; ".join(unknown))
        bound, moved = self.storage.bind_terminals(pairs, by)
        return {"bound": bound, "moved": moved}

    def bindings(self) -> list[dict[str, str]]:
        return [{"terminal_id": t, "merchant_id": m} for t, m in self.storage.terminal_bindings()]

    def stored(self, day_text: str, version: int | None) -> dict[str, Any]:
        day = self._day(day_text).isoformat()
        stored = self.storage.settlement(day, version)
        if stored is None:
            which = "any version" if version is None else f"version {version}"
            raise ClearingRefused(404, "not_cleared", f"{day} has no settlement ({which})")
        return stored

    def answer(self, day_text: str, version: int | None) -> dict[str, Any]:
        day = self._day(day_text).isoformat()
        return self._answer(day, self.stored(day, version))

    def _answer(self, day: str, stored: dict[str, Any]) -> dict[str, Any]:
        return {
            **stored["view"],
            "day": day,
            "version": stored["version"],
            "signature": stored["signature"],
            "host_key": self.key.public_key_hex(),
            "cleared_by": stored["cleared_by"],
            "cleared_at": stored["cleared_at"],
        }

    def resolve(self, terminal_id: str, seq_text: str, outcome: Any, by: str) -> dict[str, Any]:
        if (problem := terminal_id_problem(terminal_id)) is not None:
            raise ClearingRefused(400, "bad_terminal_id", problem)
        if not (seq_text.isascii() and seq_text.isdigit()) or not 0 < int(seq_text) < 2**63:
            raise ClearingRefused(400, "bad_seq", "seq must be an integer 1..2^63-1")
        if outcome not in RESOLUTIONS:
            raise ClearingRefused(400, "bad_outcome", "outcome must be 'paid' or 'void'")
        seq = int(seq_text)
        try:
            created_at = self.storage.resolve_record(terminal_id, seq, outcome, by)
        except PendingChangeRefused as exc:
            raise ClearingRefused(
                404 if exc.code == "unknown_record" else 409, exc.code, exc.detail
            ) from None
        day = business_day(created_at, city_zone(self.time_zone)).isoformat()
        return {"terminal_id": terminal_id, "seq": seq, "outcome": outcome, "day": day}

    @staticmethod
    def _day(text: str) -> Any:
        try:
            return parse_day(text)
        except SettlementError as exc:
            raise ClearingRefused(400, "bad_day", str(exc)) from None


def _nets(view: dict[str, Any]) -> dict[str, int]:
    return {str(m["merchant_id"]): int(m["net"]) for m in view["merchants"]}


def default_day(now: float, time_zone: str) -> str:
    """Yesterday in the city's zone: the day a nightly ``cardhost clear`` settles."""
    zone = city_zone(time_zone)
    return (
        datetime.fromtimestamp(now, UTC).astimezone(zone).date() - timedelta(days=1)
    ).isoformat()


# --- HTTP ----------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]
Authorise = Callable[[str, Handler], Callable[..., Any]]


def _refused(exc: ClearingRefused) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.detail), status_code=exc.status)


def _version(request: Request) -> int | None:
    text = request.query_params.get("version")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or int(text) < 1:
        raise ClearingRefused(400, "bad_query", "version must be a positive integer")
    return int(text)


def merchant_routes(
    prefix: str,
    clearing: MerchantClearing,
    authorised: Authorise,
    operator_name: Callable[[Request], str],
    read_json: Callable[[Request, int], Awaitable[Any]],
) -> list[Route]:
    def caught(handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ClearingRefused as exc:
                return _refused(exc)

        return wrapped

    async def list_merchants(request: Request) -> Response:
        rows = await run_in_threadpool(clearing.register)
        return JSONResponse({"merchants": rows})

    async def load_merchants(request: Request) -> Response:
        payload = await read_json(request, MAX_REGISTER_BYTES)
        if not isinstance(payload, dict) or not isinstance(payload.get("csv"), str):
            raise ClearingRefused(400, "bad_request", 'body must be {"csv": "<register CSV>"}')
        answer = await run_in_threadpool(
            clearing.load_register, payload["csv"], operator_name(request)
        )
        return JSONResponse(answer)

    async def list_bindings(request: Request) -> Response:
        rows = await run_in_threadpool(clearing.bindings)
        return JSONResponse({"terminals": rows})

    async def bind(request: Request) -> Response:
        payload = await read_json(request, MAX_REGISTER_BYTES)
        if not isinstance(payload, dict) or not isinstance(payload.get("csv"), str):
            raise ClearingRefused(
                400, "bad_request", 'body must be {"csv": "terminal_id,merchant_id lines"}'
            )
        answer = await run_in_threadpool(
            clearing.bind_terminals, payload["csv"], operator_name(request)
        )
        return JSONResponse(answer)

    async def cleared_days(request: Request) -> Response:
        rows = await run_in_threadpool(clearing.storage.cleared_days)
        return JSONResponse({"days": rows, "time_zone": clearing.time_zone})

    async def clear_day(request: Request) -> Response:
        day = str(request.path_params["day"])
        created, answer = await run_in_threadpool(clearing.clear, day, operator_name(request))
        return JSONResponse(answer | {"changed": created}, status_code=201 if created else 200)

    async def show_day(request: Request) -> Response:
        version = _version(request)
        answer = await run_in_threadpool(clearing.answer, str(request.path_params["day"]), version)
        return JSONResponse(answer)

    async def day_file(request: Request) -> Response:
        version = _version(request)
        stored = await run_in_threadpool(clearing.stored, str(request.path_params["day"]), version)
        return Response(
            stored["content"].encode("utf-8"),
            media_type="text/csv; charset=utf-8",
            headers={
                SIGNATURE_HEADER: stored["signature"],
                VERSION_HEADER: str(stored["version"]),
                KEY_HEADER: clearing.key.public_key_hex(),
            },
        )

    async def resolve(request: Request) -> Response:
        payload = await read_json(request, 4096)
        outcome = payload.get("outcome") if isinstance(payload, dict) else None
        answer = await run_in_threadpool(
            clearing.resolve,
            str(request.path_params["terminal_id"]),
            str(request.path_params["seq"]),
            outcome,
            operator_name(request),
        )
        return JSONResponse(answer)

    admin = f"{prefix}/admin"
    return [
        Route(f"{admin}/merchants", authorised(VIEWER, caught(list_merchants)), methods=["GET"]),
        Route(f"{admin}/merchants", authorised(OPERATOR, caught(load_merchants)), methods=["POST"]),
        Route(
            f"{admin}/merchant-terminals",
            authorised(VIEWER, caught(list_bindings)),
            methods=["GET"],
        ),
        Route(f"{admin}/merchant-terminals", authorised(OPERATOR, caught(bind)), methods=["POST"]),
        Route(f"{admin}/clearing", authorised(VIEWER, caught(cleared_days)), methods=["GET"]),
        Route(
            f"{admin}/clearing/{{day}}", authorised(OPERATOR, caught(clear_day)), methods=["POST"]
        ),
        Route(f"{admin}/clearing/{{day}}", authorised(VIEWER, caught(show_day)), methods=["GET"]),
        Route(
            f"{admin}/clearing/{{day}}/file", authorised(VIEWER, caught(day_file)), methods=["GET"]
        ),
        Route(
            f"{admin}/unresolved/{{terminal_id}}/{{seq}}/resolve",
            authorised(OPERATOR, caught(resolve)),
            methods=["POST"],
        ),
    ]


def page_section(storage: Storage, limit: int = 10) -> str:
    """The operator page's "Merchant clearing" table: the latest cleared days."""
    rows = []
    for entry in storage.cleared_days(limit):
        stored = storage.settlement(entry["day"], entry["version"])
        if stored is None:
            continue
        totals = stored["view"].get("totals", {})
        cells = (
            [entry["day"], entry["version"], html.escape(stored["cleared_by"])]
            + [
                totals.get(k, "-")
                for k in ("purchases", "fees", "commissions", "net", "to_pay", "credits_owed")
            ]
            + [totals.get("unresolved", "-"), totals.get("unbound", "-")]
        )
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "day", "version", "cleared by", "purchases", "fees", "commissions", "net",
            "to pay", "credits owed", "unresolved", "unbound",
        )
    )  # fmt: skip
    return (
        "<h2>Merchant clearing (fen)</h2><table><tr>" + head + "</tr>" + "".join(rows) + "</table>"
    )
