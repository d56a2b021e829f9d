"""HTTP routes of the load authority (:mod:`clearinghost.loads`), registered by
:func:`clearinghost.server.create_app`; documented in ``openapi.json``.

* ``POST /v1/terminals/{terminal_id}/loads``: authorise (MAC1 → MAC2), idempotent by
  ``load_key``; signed by the terminal's enrolled device key (``X-Terminal-Signature``).
* ``POST /v1/terminals/{terminal_id}/loads/{load_key}/completion``: the kiosk's report
  (``credited`` with the card's TAC, verified; ``not_credited``; ``unknown``); signed.
* ``GET /v1/loads?state=``: operators see every load and its state (``unknown``: the outcome the
  host could not learn yet).
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
from clearinghost.loads import LoadAuthority, LoadRefused
from sync.protocol import error_body

if TYPE_CHECKING:
    from clearinghost.server import ClearingHost

log = structlog.get_logger("clearinghost.load_routes")
MAX_LOAD_BODY_BYTES = 8192
STATES = ("authorised", "completed", "tac_mismatch", "not_credited", "unknown", "credited")
STATUS_OF = {
    "bad_request": 400,
    "bad_mac1": 422,
    "bad_amount": 422,
    "balance_limit": 422,
    "payment_mismatch": 422,
    "voucher_unknown": 422,
    "voucher_used": 409,
    "pending_unknown": 422,
    "pending_used": 409,
    "load_key_reused": 409,
    "load_unresolved": 409,
    "load_closed": 409,
    "unknown_load": 404,
}


def _json(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


@dataclass(frozen=True)
class RouteKit:
    """The server's request helpers (bounded body, terminal id rule, refusals, bounded JSON)."""

    terminal_of: Callable[[Request], str]
    read_body: Callable[[Request, int], Awaitable[bytes]]
    refusal: Callable[[int, str, str], Exception]
    parse: Callable[[bytes], Any]


def load_routes(
    host: ClearingHost,
    kit: RouteKit,
    guarded: Callable[[Callable[[Request], Awaitable[Response]]], Any],
    viewer: Callable[[Callable[[Request], Awaitable[Response]]], Any],
) -> list[Route]:
    terminal_of, read_body, refusal, parse = kit.terminal_of, kit.read_body, kit.refusal, kit.parse

    async def signed_json(request: Request) -> tuple[str, LoadAuthority, dict[str, Any]]:
        terminal_id = terminal_of(request)
        body = await read_body(request, MAX_LOAD_BODY_BYTES)
        authority = host.loads
        if authority is None:
            raise refusal(503, "loads_disabled", "this host does not authorise loads")
        terminal = await run_in_threadpool(host.storage.terminal, terminal_id)
        if terminal is None:
            raise refusal(404, "unknown_terminal", f"terminal {terminal_id!r} is not enrolled")
        try:
            signature = bytes.fromhex(request.headers.get(SIGNATURE_HEADER, ""))
        except ValueError:
            signature = b""
        signed = load_signed_bytes(terminal_id, request.method, request.url.path, body)
        if not verify_signature(bytes.fromhex(terminal.public_key), signature, signed):
            log.warning("load request: bad signature", terminal_id=terminal_id)
            raise refusal(
                401,
                "bad_signature",
                f"terminal {terminal_id!r}: {SIGNATURE_HEADER} does not verify under the "
                "device key enrolled for this terminal",
            )
        payload = parse(body)
        if not isinstance(payload, dict):
            raise refusal(400, "bad_request", "body must be a JSON object")
        return terminal_id, authority, payload

    async def authorise(request: Request) -> Response:
        terminal_id, authority, payload = await signed_json(request)
        try:
            mac2 = await run_in_threadpool(authority.authorise, terminal_id, payload)
        except LoadRefused as refused:
            return _json(
                STATUS_OF.get(refused.reason, 400), error_body(refused.reason, refused.detail)
            )
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
        try:
            view = await run_in_threadpool(
                authority.complete, terminal_id, key, outcome, counter, tac
            )
        except LoadRefused as refused:
            return _json(
                STATUS_OF.get(refused.reason, 400), error_body(refused.reason, refused.detail)
            )
        return _json(200, view.to_json())

    async def listing(request: Request) -> Response:
        authority = host.loads
        if authority is None:
            return _json(503, error_body("loads_disabled", "this host does not authorise loads"))
        state = request.query_params.get("state")
        if state is not None and state not in STATES:
            return _json(400, error_body("bad_request", f"state must be one of {list(STATES)}"))
        views = await run_in_threadpool(authority.loads, state)
        return _json(200, {"loads": [v.to_json() for v in views]})

    return [
        Route("/v1/terminals/{terminal_id}/loads", guarded(authorise), methods=["POST"]),
        Route(
            "/v1/terminals/{terminal_id}/loads/{load_key}/completion",
            guarded(completion),
            methods=["POST"],
        ),
        Route("/v1/loads", viewer(listing), methods=["GET"]),
    ]
