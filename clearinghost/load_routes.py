"""HTTP routes of the load authority (:mod:`clearinghost.loads`), registered by
:func:`clearinghost.server.create_app`; documented in ``openapi.json``.

* ``POST /v1/terminals/{terminal_id}/loads``: authorise (MAC1 → MAC2), idempotent by
  ``load_key``; signed by the terminal's enrolled device key (``X-Terminal-Signature``).
* ``POST /v1/terminals/{terminal_id}/loads/{load_key}/completion``: the kiosk's report
  (``credited`` with the card's TAC, verified; ``not_credited``; ``unknown``); signed.
* ``POST /v1/terminals/{terminal_id}/pending-loads``: a kiosk asks which pending loads (funds
  credited at the host for this card by someone else) the card it holds has; signed.
* ``GET /v1/loads?state=``: operators see every load and its state (``unknown``: the outcome the
  host could not learn yet; ``unresolved``: every load whose money is held).
* ``POST /v1/admin/loads/credits`` (operator): a pending load for a card (employer, group
  purchase, online payment); ``GET`` (viewer): pending loads, ``?card=`` one card's.
* ``POST /v1/admin/loads/{load_key}/resolve`` (operator): decide an unresolved load
  (``credited`` or ``not_credited``, with a reason), once.
* ``POST /v1/admin/vouchers`` (operator): issue voucher codes (他充); ``GET`` (viewer): vouchers.
* ``POST /v1/admin/loads/fare-corrections`` (operator): the host's later correction of an
  unfinished trip (a record with ``fare_unfinished: "host"``): a pending load for its card, one
  per record (:mod:`clearinghost.fare_refunds`); ``GET`` (viewer): such records, newest first,
  each with the pending load that corrected it. Fare refunds need no operator: the upload that
  stores a record with ``fare_refund_due`` makes its pending load.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.offline_store.device_key import verify_signature
from agent.tap.load_http import SIGNATURE_HEADER, load_signed_bytes
from clearinghost.loads import (
    STATES,
    LoadAuthority,
    LoadRefused,
    LoadStoreFailure,
)
from clearinghost.operators import OPERATOR, VIEWER
from sync.protocol import error_body

if TYPE_CHECKING:
    from clearinghost.server import ClearingHost

log = structlog.get_logger("clearinghost.load_routes")
MAX_LOAD_BODY_BYTES = 8192
MAX_ADMIN_LOAD_BODY_BYTES = 65536
STATUS_OF = {
    "bad_request": 400,
    "bad_mac1": 422,
    "bad_amount": 422,
    "balance_limit": 422,
    "payment_mismatch": 422,
    "voucher_unknown": 422,
    "voucher_used": 409,
    "load_key_reused": 409,
    "load_unresolved": 409,
    "load_closed": 409,
    "unknown_load": 404,
    "not_loadable_here": 422,
    "load_in_progress": 409,
    "pending_unknown": 422,
    "pending_other_card": 422,
    "pending_taken": 409,
    "pending_exists": 409,
    "voucher_exists": 409,
    "unknown_record": 404,
    "not_correctable": 422,
    "loads_disabled": 503,
}
MAX_SEQ = 2**63 - 1  # what the records table's BIGINT holds


def _json(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


@dataclass(frozen=True)
class RouteKit:
    """The server's request helpers (bounded body, terminal id rule, refusals, bounded JSON)."""

    terminal_of: Callable[[Request], str]
    read_body: Callable[[Request, int], Awaitable[bytes]]
    refusal: Callable[[int, str, str], Exception]
    parse: Callable[[bytes], Any]
    operator_name: Callable[[Request], str]


async def signed_request(
    host: ClearingHost, kit: RouteKit, request: Request, cap: int
) -> tuple[str, bytes]:
    """The terminal id and body of a kiosk's request (loads, pending loads, bills): its
    ``SIGNATURE_HEADER`` must verify, under the device key enrolled for the terminal of the
    URL, over :func:`load_signed_bytes` (terminal, method, path, body). 404 for a terminal the
    host does not know, 401 for a signature that does not verify."""
    terminal_id = kit.terminal_of(request)
    body = await kit.read_body(request, cap)
    terminal = await run_in_threadpool(host.storage.terminal, terminal_id)
    if terminal is None:
        raise kit.refusal(404, "unknown_terminal", f"terminal {terminal_id!r} is not enrolled")
    try:
        signature = bytes.fromhex(request.headers.get(SIGNATURE_HEADER, ""))
    except ValueError:
        signature = b""
    signed = load_signed_bytes(terminal_id, request.method, request.url.path, body)
    if not verify_signature(bytes.fromhex(terminal.public_key), signature, signed):
        log.warning("kiosk request: bad signature", terminal_id=terminal_id, path=request.url.path)
        raise kit.refusal(
            401,
            "bad_signature",
            f"terminal {terminal_id!r}: {SIGNATURE_HEADER} does not verify under the "
            "device key enrolled for this terminal",
        )
    return terminal_id, body


def load_routes(
    host: ClearingHost,
    kit: RouteKit,
    guarded: Callable[[Callable[[Request], Awaitable[Response]]], Any],
    authorised: Callable[[str, Callable[[Request], Awaitable[Response]]], Any],
) -> list[Route]:
    read_body, refusal, parse = kit.read_body, kit.refusal, kit.parse

    def refused(exc: LoadRefused) -> Response:
        return _json(STATUS_OF.get(exc.reason, 400), error_body(exc.reason, exc.detail))

    def failed(exc: LoadStoreFailure) -> Response:
        log.error("loads database failed", error=str(exc))
        return _json(503, error_body("storage_failure", "the loads database failed; retry later"))

    def answered(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """A loads route: the authority's refusals and the loads database's failures become
        their answers (4xx by reason, 503)."""

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except LoadRefused as exc:
                return refused(exc)
            except LoadStoreFailure as exc:
                return failed(exc)

        return wrapped

    def authority_of() -> LoadAuthority:
        if host.loads is None:
            raise refusal(503, "loads_disabled", "this host does not authorise loads")
        return host.loads

    async def signed_json(request: Request) -> tuple[str, LoadAuthority, dict[str, Any]]:
        terminal_id, body = await signed_request(host, kit, request, MAX_LOAD_BODY_BYTES)
        authority = authority_of()
        payload = parse(body)
        if not isinstance(payload, dict):
            raise refusal(400, "bad_request", "body must be a JSON object")
        return terminal_id, authority, payload

    async def authorise(request: Request) -> Response:
        terminal_id, authority, payload = await signed_json(request)
        mac2 = await run_in_threadpool(authority.authorise, terminal_id, payload)
        return _json(200, {"load_key": payload["load_key"], "mac2": mac2.hex().upper()})

    async def completion(request: Request) -> Response:
        terminal_id, authority, payload = await signed_json(request)
        key = str(request.path_params["load_key"])
        outcome, counter, tac = payload.get("outcome"), payload.get("counter"), payload.get("tac")
        if (
            not isinstance(outcome, str)
            or isinstance(counter, bool)
            or not isinstance(counter, int)
            or not isinstance(tac, str)
        ):
            return _json(400, error_body("bad_request", "outcome, counter and tac are required"))
        view = await run_in_threadpool(authority.complete, terminal_id, key, outcome, counter, tac)
        return _json(200, view.to_json())

    async def card_pending(request: Request) -> Response:
        _terminal_id, authority, payload = await signed_json(request)
        asn = payload.get("asn")
        if not isinstance(asn, str) or len(asn) != 16:
            return _json(400, error_body("bad_request", "asn must be 16 hex digits"))
        found = await run_in_threadpool(authority.pending_loads, asn)
        return _json(200, {"pending_loads": [p.to_json() for p in found]})

    async def listing(request: Request) -> Response:
        authority = authority_of()
        state = request.query_params.get("state")
        if state is not None and state not in (*STATES, "unresolved"):
            return _json(
                400,
                error_body("bad_request", f"state must be one of {[*STATES, 'unresolved']}"),
            )
        views = await run_in_threadpool(authority.loads, state)
        return _json(200, {"loads": [v.to_json() for v in views]})

    async def admin_json(request: Request) -> dict[str, Any]:
        payload = parse(await read_body(request, MAX_ADMIN_LOAD_BODY_BYTES))
        if not isinstance(payload, dict):
            raise refusal(400, "bad_request", "body must be a JSON object")
        return payload

    def integer(payload: dict[str, Any], name: str) -> int:
        value = payload.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise LoadRefused("bad_request", f"{name} must be an integer")
        return value

    async def add_credit(request: Request) -> Response:
        authority = authority_of()
        payload = await admin_json(request)
        card, source = payload.get("card"), payload.get("source", "other")
        reference = payload.get("reference", "")
        if not isinstance(card, str) or not isinstance(source, str):
            raise LoadRefused("bad_request", "card (ASN) and source must be strings")
        if not isinstance(reference, str):
            raise LoadRefused("bad_request", "reference must be a string")
        amount = integer(payload, "amount")
        pending = await run_in_threadpool(
            lambda: authority.credit(
                card, amount, source, kit.operator_name(request), reference=reference
            )
        )
        return _json(201, pending.to_json())

    async def list_credits(request: Request) -> Response:
        authority = authority_of()
        card = request.query_params.get("card")
        open_only = request.query_params.get("all") is None
        if card is not None and len(card) != 16:
            return _json(400, error_body("bad_request", "card must be 16 hex digits (the ASN)"))
        found = await run_in_threadpool(lambda: authority.pending_loads(card, open_only=open_only))
        return _json(200, {"pending_loads": [p.to_json() for p in found]})

    async def correct_fare(request: Request) -> Response:
        """An unfinished trip left to the host (``fare_unfinished: "host"``) corrected by an
        operator: a pending load for the record's card (:mod:`clearinghost.fare_refunds`)."""
        authority_of()
        payload = await admin_json(request)
        terminal_id, reason = payload.get("terminal_id"), payload.get("reason")
        if not isinstance(terminal_id, str) or not isinstance(reason, str):
            raise LoadRefused("bad_request", "terminal_id and reason must be strings")
        seq, amount = integer(payload, "seq"), integer(payload, "amount")
        if not 1 <= seq <= MAX_SEQ:
            raise LoadRefused("bad_request", f"seq must be 1..{MAX_SEQ}")
        pending = await run_in_threadpool(
            host.correct_unfinished_trip,
            terminal_id,
            seq,
            amount,
            kit.operator_name(request),
            reason,
        )
        return _json(201, pending.to_json())

    async def list_unfinished(request: Request) -> Response:
        authority_of()
        found = await run_in_threadpool(host.unfinished_trips)
        return _json(200, {"unfinished_trips": found})

    async def issue_vouchers(request: Request) -> Response:
        authority = authority_of()
        payload = await admin_json(request)
        amount = integer(payload, "amount")
        count = integer(payload, "count") if "count" in payload else 1
        codes = await run_in_threadpool(
            authority.issue_vouchers, amount, count, kit.operator_name(request)
        )
        return _json(201, {"amount": amount, "codes": codes})

    async def resolve(request: Request) -> Response:
        authority = authority_of()
        payload = await admin_json(request)
        outcome, reason = payload.get("outcome"), payload.get("reason")
        if not isinstance(outcome, str) or not isinstance(reason, str):
            return _json(400, error_body("bad_request", "outcome and reason are required"))
        key = str(request.path_params["load_key"])
        view = await run_in_threadpool(
            authority.resolve, key, outcome, kit.operator_name(request), reason
        )
        return _json(200, view.to_json())

    async def list_vouchers(request: Request) -> Response:
        authority = authority_of()
        rows = await run_in_threadpool(authority.vouchers)
        return _json(200, {"vouchers": rows})

    return [
        Route("/v1/terminals/{terminal_id}/loads", guarded(answered(authorise)), methods=["POST"]),
        Route(
            "/v1/terminals/{terminal_id}/loads/{load_key}/completion",
            guarded(answered(completion)),
            methods=["POST"],
        ),
        Route(
            "/v1/terminals/{terminal_id}/pending-loads",
            guarded(answered(card_pending)),
            methods=["POST"],
        ),
        Route("/v1/loads", authorised(VIEWER, answered(listing)), methods=["GET"]),
        Route(
            "/v1/admin/loads/credits", authorised(OPERATOR, answered(add_credit)), methods=["POST"]
        ),
        Route(
            "/v1/admin/loads/credits", authorised(VIEWER, answered(list_credits)), methods=["GET"]
        ),
        Route(
            "/v1/admin/loads/{load_key}/resolve",
            authorised(OPERATOR, answered(resolve)),
            methods=["POST"],
        ),
        Route(
            "/v1/admin/loads/fare-corrections",
            authorised(OPERATOR, answered(correct_fare)),
            methods=["POST"],
        ),
        Route(
            "/v1/admin/loads/fare-corrections",
            authorised(VIEWER, answered(list_unfinished)),
            methods=["GET"],
        ),
        Route(
            "/v1/admin/vouchers", authorised(OPERATOR, answered(issue_vouchers)), methods=["POST"]
        ),
        Route("/v1/admin/vouchers", authorised(VIEWER, answered(list_vouchers)), methods=["GET"]),
    ]
