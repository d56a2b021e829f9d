"""HTTP routes a kiosk needs besides the load routes (issue 10), registered by
:func:`clearinghost.server.create_app`; documented in ``openapi.json``.

Terminal routes, signed by the terminal's enrolled device key (``X-Terminal-Signature`` as for
the load routes, which also answer a card's pending loads:
:func:`agent.tap.load_http.load_signed_bytes`; a GET signs an empty body)::

    GET  /v1/terminals/{terminal_id}/bills/{account}          the account's bills (一帐通)
    POST /v1/terminals/{terminal_id}/bills/{bill_id}/payment  {"action": "start" | "release",
                                                              "card_id": "..."}

Operator routes::

    GET  /v1/admin/bills?state=&account=   viewer     the bill book
    POST /v1/admin/bills                   operator   {"csv": "..."}: load bills (every bad
                                                      line named, nothing loaded)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.kiosk import ACCOUNT, BILL_ID
from clearinghost.bills import STATES, BillBookError, parse_bills
from clearinghost.load_routes import RouteKit, signed_request
from clearinghost.operators import OPERATOR, VIEWER
from clearinghost.storage import PendingChangeRefused
from sync.protocol import error_body

if TYPE_CHECKING:
    from clearinghost.server import ClearingHost

log = structlog.get_logger("clearinghost.kiosk_routes")
MAX_BILL_BODY_BYTES = 4096
MAX_BILL_CSV_BYTES = 8 * 1024 * 1024
STATUS_OF = {"unknown_bill": 404, "bill_paid": 409, "bill_payment_pending": 409}

Handler = Callable[[Request], Awaitable[Response]]


def _json(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def kiosk_routes(
    prefix: str,
    host: ClearingHost,
    kit: RouteKit,
    guarded: Callable[[Handler], Any],
    authorised: Callable[[str, Handler], Any],
    operator_name: Callable[[Request], str],
) -> list[Route]:
    read_body, parse = kit.read_body, kit.parse

    async def signed(request: Request, cap: int) -> tuple[str, bytes]:
        return await signed_request(host, kit, request, cap)

    async def account_bills(request: Request) -> Response:
        await signed(request, 0)
        account = str(request.path_params["account"])
        if ACCOUNT.fullmatch(account) is None:
            return _json(400, error_body("bad_account", "account must be 1..32 of A-Z a-z 0-9 -"))
        bills = await run_in_threadpool(host.storage.bills, account, None)
        return _json(200, {"account": account, "bills": bills})

    async def bill_payment(request: Request) -> Response:
        terminal_id, body = await signed(request, MAX_BILL_BODY_BYTES)
        bill_id = str(request.path_params["bill_id"])
        if BILL_ID.fullmatch(bill_id) is None:
            return _json(400, error_body("bad_request", "bill_id is not a bill id"))
        payload = parse(body)
        action = payload.get("action") if isinstance(payload, dict) else None
        card_id = payload.get("card_id") if isinstance(payload, dict) else None
        if action not in ("start", "release") or not isinstance(card_id, str) or not card_id:
            return _json(
                400,
                error_body(
                    "bad_request", 'body must be {"action": "start" | "release", "card_id": ...}'
                ),
            )
        try:
            if action == "start":
                bill = await run_in_threadpool(
                    host.storage.start_bill_payment, bill_id, terminal_id, card_id[:40]
                )
            else:
                bill = await run_in_threadpool(
                    host.storage.release_bill_payment, bill_id, terminal_id
                )
        except PendingChangeRefused as refused:
            return _json(STATUS_OF.get(refused.code, 409), error_body(refused.code, str(refused)))
        log.info("bill_payment", bill_id=bill_id, action=action, state=bill["state"])
        return _json(200, bill)

    async def list_bills(request: Request) -> Response:
        state = request.query_params.get("state")
        account = request.query_params.get("account")
        if state is not None and state not in STATES:
            return _json(400, error_body("bad_request", f"state must be one of {list(STATES)}"))
        if account is not None and ACCOUNT.fullmatch(account) is None:
            return _json(400, error_body("bad_request", "account must be 1..32 of A-Z a-z 0-9 -"))
        bills = await run_in_threadpool(host.storage.bills, account, state)
        return _json(200, {"bills": bills})

    async def load_bills(request: Request) -> Response:
        payload = parse(await read_body(request, MAX_BILL_CSV_BYTES))
        if not isinstance(payload, dict) or not isinstance(payload.get("csv"), str):
            return _json(400, error_body("bad_request", 'body must be {"csv": "<bill CSV>"}'))
        try:
            bills = parse_bills(payload["csv"])
        except BillBookError as exc:
            return _json(422, error_body("bad_bills", str(exc)))
        counts = await run_in_threadpool(host.storage.load_bills, bills, operator_name(request))
        log.info("bills_loaded", by=operator_name(request), **counts)
        return _json(200, counts)

    terminals = f"{prefix}/terminals/{{terminal_id}}"
    return [
        Route(f"{terminals}/bills/{{account}}", guarded(account_bills), methods=["GET"]),
        Route(f"{terminals}/bills/{{bill_id}}/payment", guarded(bill_payment), methods=["POST"]),
        Route(f"{prefix}/admin/bills", authorised(VIEWER, list_bills), methods=["GET"]),
        Route(f"{prefix}/admin/bills", authorised(OPERATOR, load_bills), methods=["POST"]),
    ]
