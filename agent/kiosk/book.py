"""The kiosk's own book (``kiosk.db`` in the data directory, SQLite WAL, ``synchronous=FULL``):
every cash event of the note acceptor and every top-up or bill session, so that money taken in
is always accounted for: a note is ``accepted`` (counted, later tied to the load that used it),
``disputed`` (drawn in but never confirmed: a jam, a timeout mid-note: for staff to count),
``rejected`` (handed back) or ``garbage`` (a device line that meant nothing, kept as evidence).

The signed journal (``agent.db``) stays the truth about cards; this book is the kiosk's till.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cash (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    session TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount INTEGER NOT NULL,
    detail TEXT NOT NULL,
    load_key TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount INTEGER NOT NULL,
    payment TEXT NOT NULL,
    card_id TEXT,
    state TEXT NOT NULL,
    result TEXT NOT NULL
);
"""


class KioskBook:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _now() -> str:
        return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    # -- cash ---------------------------------------------------------------------------

    def cash_event(self, session: str, kind: str, amount: int, detail: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO cash (at, session, kind, amount, detail) VALUES (?, ?, ?, ?, ?)",
                (self._now(), session, kind, amount, detail),
            )

    def cash_accepted(self, session: str) -> int:
        """Fen accepted in ``session`` and not yet used by a completed load."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM cash"
                " WHERE session = ? AND kind = 'accepted' AND load_key IS NULL",
                (session,),
            ).fetchone()
        return int(row[0])

    def cash_used(self, session: str, load_key: str) -> None:
        """The session's accepted notes paid the load ``load_key`` (the card holds it)."""
        with self._lock:
            self._db.execute(
                "UPDATE cash SET load_key = ? WHERE session = ? AND kind = 'accepted'"
                " AND load_key IS NULL",
                (load_key, session),
            )

    def cash_events(self, session: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, at, session, kind, amount, detail, load_key FROM cash"
        with self._lock:
            rows = (
                self._db.execute(sql + " WHERE session = ? ORDER BY id", (session,))
                if session
                else self._db.execute(sql + " ORDER BY id")
            ).fetchall()
        keys = ("id", "at", "session", "kind", "amount", "detail", "load_key")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def unused_cash(self) -> int:
        """Fen accepted by any session and not used by a load: owed to customers (staff)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM cash"
                " WHERE kind = 'accepted' AND load_key IS NULL"
            ).fetchone()
        return int(row[0])

    # -- sessions -----------------------------------------------------------------------

    def save_session(
        self,
        session_id: str,
        kind: str,
        amount: int,
        payment: dict[str, Any],
        card_id: str | None,
        state: str,
        result: dict[str, Any],
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions (session_id, created_at, kind, amount, payment, card_id,"
                " state, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) DO"
                " UPDATE SET amount = excluded.amount, payment = excluded.payment,"
                " card_id = COALESCE(excluded.card_id, card_id), state = excluded.state,"
                " result = excluded.result",
                (
                    session_id,
                    self._now(),
                    kind,
                    amount,
                    json.dumps(payment),
                    card_id,
                    state,
                    json.dumps(result, ensure_ascii=False),
                ),
            )

    def sessions(self, state: str | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT session_id, created_at, kind, amount, payment, card_id, state, result"
            " FROM sessions"
        )
        with self._lock:
            rows = (
                self._db.execute(sql + " WHERE state = ? ORDER BY created_at", (state,))
                if state
                else self._db.execute(sql + " ORDER BY created_at")
            ).fetchall()
        return [
            {
                "session_id": r[0],
                "created_at": r[1],
                "kind": r[2],
                "amount": r[3],
                "payment": json.loads(r[4]),
                "card_id": r[5],
                "state": r[6],
                "result": json.loads(r[7]),
            }
            for r in rows
        ]
