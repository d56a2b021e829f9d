"""The kiosk page and its JSON API over HTTP/1.1 on the loopback interface (standard library
only). The page (``agent/kiosk/static``: HTML, CSS and JS shipped as package data, no CDN, no
external font: it works offline) polls ``GET /api/state`` and posts the customer's choices:

    GET  /api/state                 phase, message, card, cash, bills, receipt
    POST /api/card                  {}                         read the card on the reader
    POST /api/cash                  {}                         start taking notes
    POST /api/load                  {"source": "cash" | "voucher" | "pending", "amount"?,
                                     "code"?, "pending_id"?}   top up the card
    POST /api/bills/lookup          {"account": "..."}         the account's bills
    POST /api/bills/pay             {"bill_id": "..."}         pay one from the card
    POST /api/reset                 {}                         back to the welcome screen
    GET  /receipts/NAME.txt         a receipt as a text file

Inputs are checked as the POS API checks them (:mod:`agent.pos.http`: bounded bodies, JSON
only, no foreign ``Origin`` or ``Host``, unknown fields named); a request while an operation
runs is answered 423 ``busy``.
"""

from __future__ import annotations

import sys
import threading
from http.server import ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import structlog

from agent.errors import AgentError
from agent.kiosk import ACCOUNT, BILL_ID
from agent.kiosk.service import Busy, KioskRequestError, KioskService
from agent.pos.http import LOOPBACK_NAMES, BadRequest, PosHandler, amount_of

log = structlog.get_logger("agent.kiosk.http")

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/kiosk.css": ("kiosk.css", "text/css; charset=utf-8"),
    "/kiosk.js": ("kiosk.js", "text/javascript; charset=utf-8"),
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)


def static_file(name: str) -> bytes:
    return resources.files("agent.kiosk").joinpath("static", name).read_bytes()


class KioskHandler(PosHandler):
    server: KioskHttpServer  # type: ignore[assignment]
    server_version = "cardagent-kiosk"

    def _dispatch(self, method: str) -> None:
        if method != "POST" and self.headers.get("Content-Length", "0") != "0":
            self.close_connection = True
        try:
            self._check_host()
            url = urlsplit(self.path)
            if method == "GET" and url.path in STATIC:
                name, media = STATIC[url.path]
                self._send_raw(200, static_file(name), media)
                return
            if method == "GET" and url.path.startswith("/receipts/"):
                text = self.server.service.receipt_text(url.path.removeprefix("/receipts/"))
                if text is None:
                    raise BadRequest(404, "not_found", "no such receipt")
                self._send_raw(200, text, "text/plain; charset=utf-8")
                return
            status, body = self._api(method, url.path)
        except BadRequest as exc:
            status, body = exc.status, {"error": exc.code, "detail": exc.detail}
        except KioskRequestError as exc:
            status, body = exc.status, {"error": exc.code, "detail": exc.detail}
        except Busy as exc:
            status, body = 423, {"error": "busy", "detail": str(exc)}
        except AgentError as exc:
            log.error("kiosk_request_failed", party=exc.party, error=str(exc))
            status, body = 503, {"error": f"{exc.party}_error", "detail": f"{exc.party}: {exc}"}
        except Exception:  # a bug must not leave the page without an answer
            log.exception("kiosk_bug")
            status, body = 500, {"error": "internal", "detail": "internal error (logged)"}
        self._send(status, body)

    def _send_raw(self, status: int, data: bytes, media: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Frame-Options", "DENY")
        self.end_headers()
        self.wfile.write(data)

    def _check_host(self) -> None:
        host = self.headers.get("Host")
        if host is not None and urlsplit(f"//{host}").hostname not in LOOPBACK_NAMES:
            self.close_connection = True
            raise BadRequest(403, "foreign_host", f"requests for host {host} are refused")

    def _api(self, method: str, path: str) -> tuple[int, Any]:
        service = self.server.service
        if path == "/api/state" and method == "GET":
            return 200, service.snapshot()
        if method != "POST" or not path.startswith("/api/"):
            raise BadRequest(404, "not_found", f"no route {method} {path}")
        if path == "/api/card":
            self._body({})
            service.read_card()
        elif path == "/api/cash":
            self._body({})
            service.start_cash()
        elif path == "/api/load":
            data = self._body({"source": True, "amount": False, "code": False, "pending_id": False})
            amount = amount_of(data["amount"]) if data.get("amount") is not None else None
            code, pending = data.get("code"), data.get("pending_id")
            if not isinstance(code, str | None) or not isinstance(pending, str | None):
                raise BadRequest(422, "bad_field", "code and pending_id are strings")
            service.load(str(data["source"]), amount, code, pending)
        elif path == "/api/bills/lookup":
            account = self._body({"account": True})["account"]
            if not isinstance(account, str) or ACCOUNT.fullmatch(account) is None:
                raise BadRequest(422, "bad_account", "account is 1..32 of A-Z a-z 0-9 -")
            return 200, service.lookup_bills(account)
        elif path == "/api/bills/pay":
            bill_id = self._body({"bill_id": True})["bill_id"]
            if not isinstance(bill_id, str) or BILL_ID.fullmatch(bill_id) is None:
                raise BadRequest(422, "bad_bill_id", "bill_id is not a bill id")
            service.pay_bill(bill_id)
        elif path == "/api/reset":
            self._body({})
            service.reset()
        else:
            raise BadRequest(404, "not_found", f"no route {path}")
        return 200, service.snapshot()


class KioskHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that went away mid-answer (a page closed or reloaded) is not an error."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.debug("kiosk_client_gone", client=str(client_address), error=str(error))
            return
        super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], service: KioskService) -> None:
        self.service = service
        super().__init__(address, KioskHandler)


def serve_in_thread(
    service: KioskService, host: str = "127.0.0.1", port: int = 0
) -> KioskHttpServer:
    server = KioskHttpServer((host, port), service)
    threading.Thread(target=server.serve_forever, name="kiosk-http", daemon=True).start()
    return server
