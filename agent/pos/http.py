"""The POS API over HTTP/1.1 on the loopback interface (standard library only: a validator
installs no web framework). JSON in, JSON out; the contract is ``agent/pos/openapi.json``.

Inputs are bounded and checked before anything else runs: bodies at most
:data:`MAX_BODY_BYTES` with a ``Content-Length`` (413 / 411), ``application/json`` only (415),
a foreign ``Origin`` or ``Host`` refused (403: a web page in the shop's browser must not pay
with the card on the reader, nor read it through DNS rebinding), malformed JSON, duplicate or
unknown fields, and amounts that are not integer fen answered 400 / 422 naming the problem.
A second request while the reader is in use is answered 423 ``busy`` at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import structlog

from agent.errors import AgentError, ConfigurationError
from agent.pos.service import Busy, PosRequestError, PosService

log = structlog.get_logger("agent.pos.http")

MAX_BODY_BYTES = 16 * 1024
ORDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$")
DEFAULT_WAIT_S = 15.0
MAX_LIMIT = 500
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class BadRequest(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def openapi_document() -> bytes:
    return resources.files("agent.pos").joinpath("openapi.json").read_bytes()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"field {key!r} appears twice")
        result[key] = value
    return result


def parse_body(raw: bytes, fields: dict[str, bool]) -> dict[str, Any]:
    """A JSON object of the known ``fields`` (name → required), else :class:`BadRequest`."""
    try:
        data = json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicates,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(400, "malformed_json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest(400, "malformed_json", "the body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadRequest(
            422, "unknown_field", f"unknown field(s) {', '.join(unknown)}; known: {sorted(fields)}"
        )
    missing = sorted(k for k, required in fields.items() if required and k not in data)
    if missing:
        raise BadRequest(422, "missing_field", f"missing field(s) {', '.join(missing)}")
    return data


def order_id_of(value: Any, field: str = "order_id") -> str:
    if not isinstance(value, str) or not ORDER_ID.match(value):
        raise BadRequest(
            422,
            f"invalid_{field}",
            f"{field} must be 1..64 characters A-Z a-z 0-9 . _ : - (starting with a letter or "
            f"digit), got {value!r}"[:300],
        )
    return value


def amount_of(value: Any, field: str = "amount") -> int:
    """Integer fen (分). 12.5, "1250", 1e3 and true are refused: no currency guessing."""
    if isinstance(value, bool) or not isinstance(value, int):
        kind = type(value).__name__
        raise BadRequest(
            422,
            "invalid_amount",
            f"{field} must be an integer number of fen (分; 12.50 yuan is 1250), got {kind} "
            f"{value!r}"[:300],
        )
    if value <= 0:
        raise BadRequest(422, "invalid_amount", f"{field} must be positive, got {value}")
    return value


def wait_of(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 60:
        raise BadRequest(422, "invalid_wait_s", f"wait_s must be a number 0..60, got {value!r}")
    return float(value)


class PosHandler(BaseHTTPRequestHandler):
    server: PosHttpServer | PosUnixServer
    protocol_version = "HTTP/1.1"
    server_version = "cardagent-pos"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # the head and the body go out in two writes (end_headers, then the body): with
            # Nagle's algorithm the body waited for the client's delayed ACK of the head,
            # 40 ms an answer on a keep-alive connection (a unix socket has no Nagle)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        client = self.client_address[0] if self.client_address else "unix"
        log.debug("pos_http", client=client or "unix", line=format % args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        if method != "POST" and self.headers.get("Content-Length", "0") != "0":
            self.close_connection = True  # a body nobody reads must not become the next request
        try:
            status, body = self._route(method)
        except BadRequest as exc:
            status, body = exc.status, {"error": exc.code, "detail": exc.detail}
        except PosRequestError as exc:
            status, body = exc.status, {"error": exc.code, "detail": exc.detail}
        except Busy as exc:
            status, body = 423, {"error": "busy", "detail": str(exc), "money_moved": False}
        except AgentError as exc:
            log.error("pos_request_failed", party=exc.party, error=str(exc))
            status, body = 503, {"error": f"{exc.party}_error", "detail": f"{exc.party}: {exc}"}
        except Exception:  # a bug must not leave the POS without an answer
            log.exception("pos_bug")
            status, body = 500, {"error": "internal", "detail": "internal error (logged)"}
        self._send(status, body)

    def _send(self, status: int, body: Any, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection or (status >= 400 and status not in (404, 409, 422, 423)):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _query(self, query: str, known: tuple[str, ...]) -> dict[str, str]:
        try:
            parsed = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError as exc:
            raise BadRequest(400, "bad_query", f"malformed query string: {exc}") from exc
        unknown = sorted(set(parsed) - set(known))
        if unknown:
            raise BadRequest(400, "bad_query", f"unknown query parameter(s) {', '.join(unknown)}")
        return {k: v[-1] for k, v in parsed.items()}

    def _number(self, params: dict[str, str], name: str, default: float, top: float) -> float:
        if name not in params:
            return default
        try:
            value = float(params[name])
        except ValueError as exc:
            raise BadRequest(400, "bad_query", f"{name} must be a number") from exc
        if not 0 <= value <= top:
            raise BadRequest(400, "bad_query", f"{name} must be in 0..{top:g}")
        return value

    def _body(self, fields: dict[str, bool]) -> dict[str, Any]:
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).hostname not in LOOPBACK_NAMES:
            self.close_connection = True
            raise BadRequest(403, "foreign_origin", f"requests from origin {origin} are refused")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest(411, "length_required", "send the body with a Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            raise BadRequest(411, "length_required", "a Content-Length is required")
        try:
            length = int(length_text)
        except ValueError as exc:
            self.close_connection = True
            raise BadRequest(400, "bad_length", "Content-Length is not a number") from exc
        if length < 0:
            self.close_connection = True
            raise BadRequest(400, "bad_length", "Content-Length is negative")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(
                413, "body_too_large", f"the body is {length} bytes; at most {MAX_BODY_BYTES}"
            )
        raw = self.rfile.read(length)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise BadRequest(415, "unsupported_media_type", "send Content-Type: application/json")
        if len(raw) != length:
            self.close_connection = True
            raise BadRequest(400, "truncated_body", "the body ended before its Content-Length")
        return parse_body(raw, fields)

    def _route(self, method: str) -> tuple[int, Any]:
        host = self.headers.get("Host")
        if host is not None and urlsplit(f"//{host}").hostname not in LOOPBACK_NAMES:
            # DNS rebinding: a web page whose name resolves to 127.0.0.1 must not reach the API
            self.close_connection = True
            raise BadRequest(403, "foreign_host", f"requests for host {host} are refused")
        service = self.server.service
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        if path == "/openapi.json" and method == "GET":
            self._query(url.query, ())
            return 200, json.loads(openapi_document())
        if path == "/v1/card" and method == "GET":
            params = self._query(url.query, ("wait_s",))
            return 200, service.card(self._number(params, "wait_s", 0.0, 60.0))
        if path == "/v1/purchases" and method == "POST":
            data = self._body({"order_id": True, "amount": True, "wait_s": False})
            order = order_id_of(data["order_id"])
            amount = amount_of(data["amount"])
            wait = wait_of(data.get("wait_s", DEFAULT_WAIT_S))
            return 200, service.purchase(order, amount, wait)
        if path.startswith("/v1/orders/") and method == "GET":
            self._query(url.query, ())
            order = order_id_of(unquote(path.removeprefix("/v1/orders/")))
            found = service.order(order)
            if found is None:
                raise BadRequest(404, "unknown_order", f"no order {order} on this terminal")
            return 200, found
        if path == "/v1/transactions" and method == "GET":
            params = self._query(url.query, ("limit",))
            limit = int(self._number(params, "limit", 20, MAX_LIMIT))
            return 200, {"transactions": service.transactions(limit)}
        if path == "/v1/refunds" and method == "POST":
            data = self._body({"refund_id": True, "order_id": True, "amount": True})
            return 200, service.refund(
                order_id_of(data["refund_id"], "refund_id"),
                order_id_of(data["order_id"]),
                amount_of(data["amount"]),
            )
        known = ("/v1/card", "/v1/purchases", "/v1/transactions", "/v1/refunds", "/openapi.json")
        if path in known or path.startswith("/v1/orders/"):
            raise BadRequest(405, "method_not_allowed", f"{method} is not allowed on {path}")
        raise BadRequest(404, "not_found", f"no route {path}")


class PosHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], service: PosService) -> None:
        self.service = service
        super().__init__(address, PosHandler)


def serve_in_thread(service: PosService, host: str = "127.0.0.1", port: int = 0) -> PosHttpServer:
    """Start the server on a daemon thread (tests, embedding); ``shutdown()`` stops it."""
    server = PosHttpServer((host, port), service)
    threading.Thread(target=server.serve_forever, name="pos-http", daemon=True).start()
    return server


class PosUnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The same API on a Unix socket (mode 0660: the POS software's group reaches it, nobody
    else; no TCP port at all). A stale socket file is replaced; any other file is refused."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, service: PosService) -> None:
        self.service = service
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigurationError(
                    f"{path} exists and is not a socket: refusing to replace it"
                )
            path.unlink()
        old = os.umask(0o117)
        try:
            super().__init__(str(path), PosHandler)
        finally:
            os.umask(old)

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
