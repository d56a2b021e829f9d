"""Signed batches (issue 14): one device signature over the batch head, the hash chain of every
record, bulk inserts, and the audit that re-verifies each record's own signature.

Against the real host (uvicorn on 127.0.0.1) on SQLite and on a real PostgreSQL server
(``tests/test_sync_storage.PgServer``), over HTTP with httpx, and the real sync daemon:

* a genuine signed batch is stored with its head as evidence and its lines verbatim;
* a head signature forged, made by another terminal's key, made for another terminal, another
  range or another body, or missing where the host requires one, is refused (422) and nothing
  of the batch is stored;
* a record altered inside a batch the terminal key signed again (a thief or a bug) breaks the
  hash check or the chain: refused at that seq, nothing from it on stored;
* a record whose own signature is bad under a good chain and head (a terminal bug) is stored
  and flagged by ``cardhost audit``, once; tampering with the host's database after the fact
  (a body, a batch signature) is flagged too;
* the host's quick record parser accepts exactly what the full one accepts (hypothesis).

Device and host keys are generated per test: TEST KEYS ONLY.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.offline_store import DeviceKey, RecordBody
from agent.offline_store.records import Record, entry_from_json, record_to_json, seal_record
from clearinghost import cli as host_cli
from clearinghost.audit import audit_storage
from clearinghost.keys import HostKey
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import PostgresStorage, SqliteStorage, Storage
from sync import protocol
from tests.test_sync_storage import PgServer
from tests.test_sync_support import Terminal, daemon_for, fast_settings, make_host

TERMINAL = "BUS-B1"
OTHER = "BUS-B2"


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "sqlite":
        store: Storage = SqliteStorage(tmp_path / "host.db")
    else:
        store = PostgresStorage(request.getfixturevalue("pg").new_database())
    yield store
    store.close()


def chain(
    key: DeviceKey,
    count: int,
    *,
    start: int = 1,
    prev: str = "0" * 64,
    terminal: str = TERMINAL,
    sign: Callable[[bytes], bytes] | None = None,
) -> list[Record]:
    records: list[Record] = []
    for seq in range(start, start + count):
        record = seal_record(
            seq=seq,
            created_at=f"2024-05-01T08:{seq // 60 % 60:02d}:{seq % 60:02d}.000Z",
            terminal_id=terminal,
            body=RecordBody("purchase", f"0310{seq:016X}", 200, {"n": seq, "product": "test"}),
            prev_hash=prev,
            sign=sign or key.sign,
        )
        records.append(record)
        prev = record.hash
    return records


def raw_batch(
    records: list[Record] | list[str],
    *,
    terminal: str = TERMINAL,
    sign: Callable[[bytes], bytes] | None,
    head: dict[str, Any] | None = None,
    signature: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A gzip body and its headers; ``head`` overrides fields of the signed head (a head made
    for another terminal, range or body), ``signature`` replaces the signature outright."""
    lines = [r if isinstance(r, str) else record_to_json(r) for r in records]
    raw = "".join(line + "\n" for line in lines).encode()
    entries = [entry_from_json(line) for line in lines]
    digest = hashlib.sha256(raw).hexdigest()
    headers = {
        "Content-Encoding": "gzip",
        "Content-Type": protocol.NDJSON,
        protocol.IDEMPOTENCY_HEADER: f"{entries[0].seq}-{entries[-1].seq}-{digest[:32]}",
    }
    fields = protocol.batch_head(
        terminal, entries[0].seq, entries[-1].seq, len(entries), entries[-1].hash, digest
    )
    fields.update(head or {})
    if signature is not None:
        headers[protocol.BATCH_SIGNATURE_HEADER] = signature
    elif sign is not None:
        headers[protocol.BATCH_SIGNATURE_HEADER] = sign(protocol.batch_signed_bytes(fields)).hex()
    return gzip.compress(raw), headers


@dataclasses.dataclass
class Served:
    host: ClearingHost
    client: httpx.Client
    key: DeviceKey  # TERMINAL's device key
    other: DeviceKey  # OTHER's device key

    def post(self, body: bytes, headers: dict[str, str], terminal: str = TERMINAL) -> Any:
        return self.client.post(protocol.records_path(terminal), content=body, headers=headers)

    def held(self, terminal: str = TERMINAL) -> list[int]:
        return [seq for seq, _hash in self.host.storage.record_keys(terminal)]


@pytest.fixture
def served(storage: Storage) -> Iterator[Served]:
    host = make_host(storage, HostKey.generate())
    key, other = DeviceKey.generate(), DeviceKey.generate()
    storage.register_terminal(TERMINAL, key.public_key_bytes.hex())
    storage.register_terminal(OTHER, other.public_key_bytes.hex())
    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        yield Served(host, client, key, other)


# --- genuine batches ---------------------------------------------------------------------------


def test_a_signed_batch_is_stored_with_its_head_and_lines_verbatim(served: Served) -> None:
    records = chain(served.key, 6)
    answer = served.post(*raw_batch(records, sign=served.key.sign))
    assert answer.status_code == 200, answer.text
    assert (answer.json()["ack_seq"], answer.json()["stored"]) == (6, 6)
    assert served.held() == list(range(1, 7))
    stored = served.host.storage.records(TERMINAL, 0, 10)
    assert stored == [r.to_dict() for r in records]
    ((head, held),) = served.host.storage.batch_heads(TERMINAL, 0, 6)
    assert head.fields["first_seq"] == 1 and head.fields["last_seq"] == 6
    assert held == records[-1].hash == head.fields["last_hash"]
    assert head.public_key == served.key.public_key_bytes.hex()
    # the next batch chains on; a replay is a duplicate, nothing stored twice
    more = chain(served.key, 3, start=7, prev=records[-1].hash)
    assert served.post(*raw_batch(more, sign=served.key.sign)).json()["ack_seq"] == 9
    again = served.post(*raw_batch(records, sign=served.key.sign)).json()
    assert (again["stored"], again["duplicates"], again["ack_seq"]) == (0, 6, 9)
    assert served.held() == list(range(1, 10))
    assert audit_storage(served.host.storage).findings == []


def test_the_daemon_signs_its_batches(tmp_path: Path) -> None:
    terminal = Terminal.provision(tmp_path, "BUS-D1")
    for _ in range(12):
        terminal.tap()
    host_key = HostKey.generate()
    host = make_host(SqliteStorage(tmp_path / "host.db"), host_key, require_batch_signature=True)
    with HostServer(create_app(host)) as server:
        daemon = daemon_for(terminal, fast_settings(server.url, host_key, batch_size=5))
        report = daemon.upload_pending()
        daemon.close()
    assert (report.ack_seq, report.batches) == (12, 3)
    heads = host.storage.batch_heads("BUS-D1", 0, 12)
    assert [(h.fields["first_seq"], h.fields["last_seq"]) for h, _ in heads] == [
        (1, 5),
        (6, 10),
        (11, 12),
    ]
    assert host.storage.record_keys("BUS-D1") == sorted(terminal.written.items())
    assert audit_storage(host.storage).records == 12
    host.storage.close()


# --- refused heads -----------------------------------------------------------------------------


def refused(served: Served, answer: httpx.Response, seq: int, reason: str) -> None:
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert (body["seq"], body["reason"], body["stored"]) == (seq, reason, 0), body


@pytest.mark.parametrize(
    "case",
    [
        "forged",  # random bytes
        "other_terminals_key",  # a head made with another terminal's device key
        "made_for_another_terminal",  # the right key, the head names another terminal
        "another_range",  # the right key, the head names other seqs
        "another_body",  # the right key over another body: the batch was altered in transit
        "ack_hash_not_last",  # the right key, another chain head
    ],
)
def test_a_batch_whose_head_does_not_verify_is_refused_whole(served: Served, case: str) -> None:
    records = chain(served.key, 5)
    sign: Callable[[bytes], bytes] | None = served.key.sign
    head: dict[str, Any] = {}
    signature = None
    if case == "forged":
        signature = "5a" * 64
    elif case == "other_terminals_key":
        sign = served.other.sign
    elif case == "made_for_another_terminal":
        head = {"terminal_id": OTHER}
    elif case == "another_range":
        head = {"first_seq": 2}
    elif case == "another_body":
        head = {"body_sha256": hashlib.sha256(b"another body").hexdigest()}
    else:
        head = {"last_hash": records[-2].hash}
    answer = served.post(*raw_batch(records, sign=sign, head=head, signature=signature))
    refused(served, answer, 1, "bad_batch_signature")
    assert answer.json()["error"] == "record_refused"
    assert served.held() == []
    terminal = served.host.storage.terminal(TERMINAL)
    assert terminal is not None and terminal.ack_seq == 0
    kinds = [a["kind"] for a in served.host.storage.anomalies(TERMINAL)]
    assert kinds == ["bad_batch_signature"]
    # the genuine batch still goes in
    assert served.post(*raw_batch(records, sign=served.key.sign)).status_code == 200
    assert served.held() == [1, 2, 3, 4, 5]


def test_a_head_signed_by_another_terminal_for_itself_does_not_count_here(served: Served) -> None:
    """OTHER's key signs a genuine head for its own id; posted at TERMINAL's URL it fails."""
    records = chain(served.other, 3, terminal=OTHER)
    body, headers = raw_batch(records, terminal=OTHER, sign=served.other.sign)
    assert served.post(body, headers, terminal=OTHER).status_code == 200
    refused(served, served.post(body, headers, terminal=TERMINAL), 1, "bad_batch_signature")
    assert served.held() == [] and served.held(OTHER) == [1, 2, 3]


def test_a_missing_head_signature_is_refused_where_required(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "host.db")
    host = make_host(storage, HostKey.generate(), require_batch_signature=True)
    key = DeviceKey.generate()
    storage.register_terminal(TERMINAL, key.public_key_bytes.hex())
    records = chain(key, 3)
    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        body, headers = raw_batch(records, sign=None)
        answer = client.post(protocol.records_path(TERMINAL), content=body, headers=headers)
        assert answer.status_code == 422 and answer.json()["error"] == "batch_signature_required"
        assert storage.count_records() == 0
        body, headers = raw_batch(records, sign=key.sign)
        assert (
            client.post(protocol.records_path(TERMINAL), content=body, headers=headers).json()[
                "ack_seq"
            ]
            == 3
        )
    storage.close()


def test_without_a_head_every_record_signature_is_verified(served: Served) -> None:
    """A v1 upload (no header) of records whose own signatures are bad: the first is refused
    (the host falls back to per-record verification, never to trusting the chain alone)."""
    records = chain(served.key, 4, sign=served.other.sign)
    refused(served, served.post(*raw_batch(records, sign=None)), 1, "bad_signature")
    assert served.held() == []


def test_a_malformed_head_signature_is_a_bad_batch(served: Served) -> None:
    records = chain(served.key, 2)
    answer = served.post(*raw_batch(records, sign=None, signature="not hex"))
    assert answer.status_code == 400 and answer.json()["error"] == "bad_batch"
    assert served.held() == []


# --- altered records under a re-signed head ----------------------------------------------------


def test_a_record_altered_under_a_resigned_head_breaks_its_hash(served: Served) -> None:
    records = chain(served.key, 6)
    lines = [record_to_json(r) for r in records]
    altered = records[3].to_dict()
    altered["amount"] = 1  # the hash no longer covers the content
    lines[3] = json.dumps(altered, sort_keys=True, separators=(",", ":"))
    answer = served.post(*raw_batch(lines, sign=served.key.sign))
    assert answer.status_code == 422 and answer.json()["reason"] == "bad_hash", answer.text
    assert (answer.json()["seq"], answer.json()["stored"]) == (4, 3)
    assert served.held() == [1, 2, 3], "the records before it verified and link: stored"


def test_a_record_rehashed_under_a_resigned_head_breaks_the_chain(served: Served) -> None:
    """Record 4 replaced by another, hashed and signed properly: record 5 no longer links."""
    records = chain(served.key, 6)
    forged = seal_record(
        seq=4,
        created_at=records[3].created_at,
        terminal_id=TERMINAL,
        body=RecordBody("purchase", records[3].card_id, 1, {"n": 4, "product": "test"}),
        prev_hash=records[2].hash,
        sign=served.key.sign,
    )
    answer = served.post(*raw_batch([*records[:3], forged, *records[4:]], sign=served.key.sign))
    assert answer.status_code == 422 and answer.json()["reason"] == "chain_break", answer.text
    assert (answer.json()["seq"], answer.json()["stored"]) == (5, 4)
    assert served.held() == [1, 2, 3, 4]


# --- the audit ---------------------------------------------------------------------------------


def test_a_bad_record_signature_under_a_good_chain_is_flagged_by_the_audit(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    """A terminal bug: records 3 and 4 carry signatures of another key, the chain and the head
    are good. The host stores them (the head proved where they come from); the audit flags
    exactly those, once."""
    good = chain(served.key, 2)
    bad = chain(served.key, 2, start=3, prev=good[-1].hash, sign=served.other.sign)
    tail = chain(served.key, 2, start=5, prev=bad[-1].hash)
    answer = served.post(*raw_batch([*good, *bad, *tail], sign=served.key.sign))
    assert answer.status_code == 200 and answer.json()["ack_seq"] == 6, answer.text

    report = audit_storage(served.host.storage)
    assert (report.records, report.batches) == (6, 1)
    assert [(t, s, f.kind) for t, s, f in report.findings] == [
        (TERMINAL, 3, "audit_bad_signature"),
        (TERMINAL, 4, "audit_bad_signature"),
    ]
    flagged = [(a["seq"], a["kind"]) for a in served.host.storage.anomalies(TERMINAL)]
    assert sorted(flagged) == [(3, "audit_bad_signature"), (4, "audit_bad_signature")]
    again = audit_storage(served.host.storage)
    assert (again.records, again.findings) == (0, []), "the cursor moved: nothing twice"
    # the next records are audited from the cursor on
    more = chain(served.key, 2, start=7, prev=tail[-1].hash)
    assert served.post(*raw_batch(more, sign=served.key.sign)).status_code == 200
    assert audit_storage(served.host.storage).records == 2
    assert len(served.host.storage.anomalies(TERMINAL)) == 2


def test_the_audit_cli_flags_a_host_database_changed_after_the_fact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "host.db"
    storage = SqliteStorage(db)
    host = make_host(storage, HostKey.generate())
    key = DeviceKey.generate()
    storage.register_terminal(TERMINAL, key.public_key_bytes.hex())
    first = chain(key, 4)
    second = chain(key, 4, start=5, prev=first[-1].hash)
    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        for batch in (first, second):
            body, headers = raw_batch(batch, sign=key.sign)
            assert client.post(protocol.records_path(TERMINAL), content=body, headers=headers)
    storage.close()
    capsys.readouterr()
    assert host_cli.main(["audit", "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 8
    # someone edits the host's database: a stored amount, a stored batch signature
    raw = sqlite3.connect(db)
    body = json.loads(raw.execute("SELECT body FROM records WHERE seq = 6").fetchone()[0])
    body["amount"] = 1
    raw.execute("UPDATE records SET body = ? WHERE seq = 6", (json.dumps(body),))
    raw.execute("UPDATE batch_signatures SET signature = ? WHERE first_seq = 1", ("00" * 64,))
    raw.execute("DELETE FROM audit_cursors")  # and an audit from the start
    raw.commit()
    raw.close()

    assert host_cli.main(["audit", "--db", str(db), "--terminal", TERMINAL]) == 1
    report = json.loads(capsys.readouterr().out)
    found = sorted((f["seq"], f["kind"]) for f in report["findings"])
    # the edited record's signature still covers its (unchanged) hash field: a bad hash
    assert found == [(4, "audit_bad_batch_signature"), (6, "audit_bad_hash")], report


# --- the quick parser is the full parser -------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from(["\ud800", '"', "\\", "\n"]))
_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False),
    _TEXT,
    st.lists(st.integers(), max_size=2),
)


@st.composite
def record_values(draw: st.DrawFn) -> dict[str, Any]:
    key = DeviceKey.generate()
    record = seal_record(
        seq=draw(st.integers(min_value=1, max_value=2**63 - 1)),
        created_at="2024-05-01T08:00:00.000Z",
        terminal_id=TERMINAL,
        body=RecordBody(
            draw(st.sampled_from(["purchase", "unresolved", "维护"])),
            "0310000000000001",
            draw(st.integers(min_value=0, max_value=2**63 - 1)),
            draw(
                st.dictionaries(
                    st.text(st.characters(codec="utf-8"), min_size=1, max_size=4),
                    st.integers(min_value=-(2**63), max_value=2**63 - 1),
                    max_size=3,
                )
            ),
        ),
        prev_hash="0" * 64,
        sign=key.sign,
    )
    value = record.to_dict()
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        name = draw(st.sampled_from([*value, "fields.x", "extra"]))
        if name == "extra":
            value["extra"] = 1
        elif name == "fields.x":
            fields = value.get("fields")
            fields = fields if isinstance(fields, dict) else {}
            value["fields"] = {**fields, draw(st.text(max_size=2)): draw(_VALUE)}
        elif draw(st.booleans()):
            del value[name]
        else:
            value[name] = draw(
                _VALUE
                | st.sampled_from(
                    ["2024-13-01T00:00:00.000Z", "2024-05-01T08:00:00.000Z", "A" * 64, "a" * 128]
                )
            )
    return value


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(record_values())
def test_the_quick_record_parser_accepts_exactly_what_the_full_one_accepts(
    value: dict[str, Any],
) -> None:
    line = json.dumps(value, ensure_ascii=False)
    try:
        expected: Any = entry_from_json(line)
    except (ValueError, TypeError) as exc:
        expected = exc
    try:
        got: Any = protocol.parse_record_line(line)
    except (ValueError, TypeError) as exc:
        got = exc
    if isinstance(expected, Exception):
        assert isinstance(got, Exception), (line, got)
        return
    assert isinstance(got, protocol.RecordLine), (line, got)
    assert got.record() == expected
    assert got.digest == hashlib.sha256(expected.canonical_bytes()).hexdigest()
    assert (got.seq, got.hash, got.prev_hash, got.amount, got.kind, got.card_id) == (
        expected.seq,
        expected.hash,
        expected.prev_hash,
        expected.amount,
        expected.kind,
        expected.card_id,
    )
    assert got.fields == dict(expected.fields)


# --- the canonical-line parser is the full parser ----------------------------------------------

# text that needs no escape in canonical JSON, text that does, non-ASCII and a lone surrogate
_PLAIN = st.text(
    st.characters(codec="utf-8", exclude_characters=['"', "\\", *map(chr, range(0x20))]),
    min_size=1,
    max_size=6,
)
_ANY_TEXT = st.text(
    st.characters(codec="utf-8") | st.sampled_from(['"', "\\", "\n", "\x00", "\x7f", "\u2028"]),
    max_size=6,
)
_FIELD_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    _ANY_TEXT,
)
# edits of a line's text: each keeps most of it canonical-looking, so the quick pattern is
# tried on lines that differ from a genuine one by one character or one member
_EDITS = [
    ('"amount":', '"amount":0'),  # a leading zero
    ('"seq":', '"seq":-'),
    ('"seq":', '"seq":0'),
    ('","kind"', '", "kind"'),  # whitespace
    ('"fields":{', '"fields":{"":1,'),  # an empty field name
    ('"fields":{', '"fields":{"zz":1.5,'),  # a float
    ('"fields":{', '"fields":{"zz":[1],'),
    ('"fields":{', '"fields":{"zz":{},'),
    ('"fields":{', '"fields":{"zz":1,"zz":2,'),  # a repeated, unsorted key
    ('"fields":{', '"fields":{"~":9223372036854775808,'),  # beyond int64
    ('"fields":{', '"fields":{"\\ud800":1,'),  # a lone surrogate
    ('"fields":{', '"fields":{"a":"\\u0041",'),  # an escape the encoder does not write
    ('"fields":{', '"fields":{"a":NaN,'),
    ('"card_id":"', '"card_id":"\\u0041'),
    ('"card_id":"', '"card_id":"\\n'),  # an escape the encoder writes: the full path decides
    ('"hash":"', '"hash":"A'),
    # the same length, not lowercase hex (the pattern matches hex members by length only)
    ('"prev_hash":"0', '"prev_hash":"A'),
    ('"prev_hash":"0', '"prev_hash":"g'),
    ('"prev_hash":"0', '"prev_hash":" '),
    ('"prev_hash":"0', '"prev_hash":"\uff10'),
    ('"prev_hash":"2d', '"prev_hash":"2D'),
    ('"prev_hash":"2d', '"prev_hash":"2\\'),
    ('"prev_hash":"', '"prev_hash":"0'),
    ('"signature":"', '"signature":"f'),
    ("T08:", "T25:"),  # not a time
    (".000Z", ".000+00:00"),
    ('"terminal_id":"', '"terminal_id":"x'),
    ('{"amount"', '{"amount":1,"amount"'),
    ('"}', '","extra":1}'),
]


@st.composite
def canonical_lines(draw: st.DrawFn) -> str:
    """A genuine record line as a daemon writes it, then maybe edited: one of :data:`_EDITS`,
    one character replaced, inserted or removed, or two members swapped."""
    key = DeviceKey.generate()
    record = seal_record(
        seq=draw(st.integers(min_value=1, max_value=2**63 - 1)),
        created_at=draw(st.sampled_from(["2024-05-01T08:00:00.000Z", "2024-02-29T23:59:59.999Z"])),
        terminal_id=draw(_PLAIN | st.just(TERMINAL)),
        body=RecordBody(
            draw(st.sampled_from(["purchase", "unresolved", "维护"]) | _PLAIN),
            draw(st.just("0310000000000001") | _PLAIN | _ANY_TEXT.filter(bool)),
            draw(st.integers(min_value=0, max_value=2**63 - 1)),
            draw(st.dictionaries(_ANY_TEXT.filter(bool), _FIELD_VALUE, max_size=4)),
        ),
        prev_hash=draw(st.sampled_from(["0" * 64, hashlib.sha256(b"x").hexdigest()])),
        sign=key.sign,
    )
    line = record_to_json(record)
    edit = draw(st.sampled_from(["none", "edit", "replace", "insert", "delete", "swap"]))
    if edit == "edit":
        old, new = draw(st.sampled_from(_EDITS))
        line = line.replace(old, new, 1)
    elif edit in ("replace", "insert", "delete"):
        at = draw(st.integers(min_value=0, max_value=len(line) - 1))
        char = draw(st.characters(codec="utf-8") | st.sampled_from(list('"\\{},:0aA ')))
        skip = 0 if edit == "insert" else 1
        line = line[:at] + ("" if edit == "delete" else char) + line[at + skip :]
    elif edit == "swap":
        value = record.to_dict()
        names = sorted(value)
        i = draw(st.integers(min_value=0, max_value=len(names) - 2))
        names[i], names[i + 1] = names[i + 1], names[i]
        line = json.dumps({n: value[n] for n in names}, separators=(",", ":"), ensure_ascii=False)
    return line


@given(canonical_lines())
def test_the_canonical_line_parser_accepts_exactly_what_the_full_one_accepts(line: str) -> None:
    """Whatever line the host's fastest path takes (it skips the JSON decoding of the line and
    its canonical re-encoding), it gives exactly the record and hash the full parser gives;
    every line the full parser refuses, it refuses too (and leaves to the full parser's
    message); the public parser agrees with the full one either way."""
    try:
        expected: Any = entry_from_json(line)
    except (ValueError, TypeError) as exc:
        expected = exc
    fast = protocol._canonical_record_line(line)
    try:
        got: Any = protocol.parse_record_line(line)
    except (ValueError, TypeError) as exc:
        got = exc
    if isinstance(expected, Exception):
        assert fast is None, line
        assert isinstance(got, Exception), (line, got)
        return
    assert isinstance(got, protocol.RecordLine), (line, got)
    digest = hashlib.sha256(expected.canonical_bytes()).hexdigest()
    for parsed in (got, fast) if fast is not None else (got,):
        assert parsed.record() == expected, line
        assert parsed.digest == digest, line
        assert parsed.fields == dict(expected.fields)
        assert (
            parsed.seq,
            parsed.created_at,
            parsed.terminal_id,
            parsed.kind,
            parsed.card_id,
            parsed.amount,
            parsed.prev_hash,
            parsed.hash,
            parsed.signature,
            parsed.line,
        ) == (
            expected.seq,
            expected.created_at,
            expected.terminal_id,
            expected.kind,
            expected.card_id,
            expected.amount,
            expected.prev_hash,
            expected.hash,
            expected.signature,
            line,
        )
    if fast is not None:  # only a line that is its own canonical encoding takes it
        assert line == record_to_json(expected)


def _a_daemon_line() -> tuple[Record, str]:
    record = seal_record(
        seq=7,
        created_at="2024-05-01T08:00:00.000Z",
        terminal_id=TERMINAL,
        body=RecordBody("purchase", "0310000000000001", 200, {"tac": "0A1B2C3D"}),
        prev_hash=hashlib.sha256(b"prev").hexdigest(),
        sign=DeviceKey.generate().sign,
    )
    return record, record_to_json(record)


def _hex_edits() -> list[tuple[str, int, str]]:
    """(member, position, replacement) for each hex member: the pattern matches these members
    by length only, so everything that is not lowercase hex of that length must be caught
    after it: an uppercase digit, a letter beyond f, a space (which ``bytes.fromhex`` skips),
    a quote, non-ASCII (a full-width digit), a digit too many or too few."""
    edits: list[tuple[str, int, str]] = []
    for member in ("hash", "prev_hash", "signature"):
        for at in (0, 31, -1):
            for char in ("A", "F", "g", " ", '"', "\\", "\uff10", "\u00e9"):
                edits.append((member, at, char))
        edits.append((member, 0, "+1"))  # one digit too many
        edits.append((member, 0, "-1"))  # one too few
    return edits


@pytest.mark.parametrize(("member", "at", "char"), _hex_edits())
def test_a_hex_member_that_is_not_lowercase_hex_is_refused_as_the_full_parser_refuses_it(
    member: str, at: int, char: str
) -> None:
    record, line = _a_daemon_line()
    assert protocol._canonical_record_line(line) is not None  # the untouched line takes it
    value: str = getattr(record, member)
    if char == "+1":
        edited = value + "0"
    elif char == "-1":
        edited = value[1:]
    else:
        index = at % len(value)
        edited = value[:index] + char + value[index + 1 :]
    line = line.replace(f'"{member}":"{value}"', f'"{member}":"{edited}"', 1)
    assert edited in line
    with pytest.raises((ValueError, TypeError)) as full:
        entry_from_json(line)
    assert protocol._canonical_record_line(line) is None, line
    with pytest.raises((ValueError, TypeError)) as quick:
        protocol.parse_record_line(line)
    assert (type(quick.value), str(quick.value)) == (type(full.value), str(full.value))
    if char not in ('"', "\\"):  # those two break the JSON itself, named as such
        assert member in str(full.value), full.value  # the full parser names the member


@given(
    st.dictionaries(
        _PLAIN, st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), _PLAIN)
    ),
    _PLAIN,
    st.integers(min_value=0, max_value=2**63 - 1),
)
def test_a_daemon_line_without_escapes_takes_the_canonical_path(
    fields: dict[str, Any], card_id: str, amount: int
) -> None:
    """The path is not dead code: every line a daemon writes whose text needs no escape is
    parsed by it, to the record the full parser gives."""
    key = DeviceKey.generate()
    record = seal_record(
        seq=7,
        created_at="2024-05-01T08:00:00.000Z",
        terminal_id=TERMINAL,
        body=RecordBody("purchase", card_id, amount, fields),
        prev_hash="0" * 64,
        sign=key.sign,
    )
    parsed = protocol._canonical_record_line(record_to_json(record))
    assert parsed is not None
    assert parsed.record() == record
    assert parsed.digest == parsed.hash == record.hash


# --- the upload's lines, a chunk at a time -----------------------------------------------------


@given(
    st.lists(st.binary(max_size=12) | st.sampled_from([b"\n", b"\n\n", b"ab\ncd"]), max_size=12),
    st.integers(min_value=1, max_value=8),
)
def test_lines_split_a_chunk_at_a_time_as_a_whole_stream_splits(
    chunks: list[bytes], max_line_bytes: int
) -> None:
    """The host's line reader gives the lines (numbered from 1) that splitting the whole
    inflated stream gives, however it arrives in chunks, and refuses the first line longer
    than the cap by its number, after every line before it."""
    whole = b"".join(chunks).split(b"\n")
    if whole[-1] == b"":
        whole.pop()  # a stream ending in a line end has no line after it
    expected: list[tuple[int, bytes]] = []
    refused: str | None = None
    for number, line in enumerate(whole, 1):
        if len(line) > max_line_bytes:
            refused = f"line {number} is longer than {max_line_bytes} bytes"
            break
        expected.append((number, line))
    got: list[tuple[int, bytes]] = []
    try:
        for item in protocol._lines(iter(chunks), max_line_bytes):
            got.append(item)
    except protocol.BatchTooLarge as exc:
        assert str(exc) == refused
    else:
        assert refused is None
    assert got == expected


def _read_lines(
    lines: Callable[..., Any], body: bytes, encoding: str | None, limits: tuple[int, int, int]
) -> tuple[list[tuple[int, str]] | str, str]:
    """What a body reader gives: its lines, or its refusal (type and message); and the
    digest of the bytes it fed."""
    digest = hashlib.sha256()
    max_bytes, max_records, max_line_bytes = limits
    try:
        got: list[tuple[int, str]] | str = list(
            lines(
                body,
                encoding,
                digest,
                max_bytes=max_bytes,
                max_records=max_records,
                max_line_bytes=max_line_bytes,
            )
        )
    except protocol.BadBatch as exc:
        got = f"{type(exc).__name__}: {exc}"
    return got, digest.hexdigest()


def _streamed(body: bytes, encoding: str | None, digest: Any, **limits: int) -> Any:
    """The body read in steps only (:func:`protocol._streamed_body_lines`)."""
    name = (encoding or "identity").strip().lower()
    if name not in ("gzip", "identity"):
        raise protocol.BadBatch(f"unsupported Content-Encoding {name[:40]!r}")
    return protocol._streamed_body_lines(
        body, name, digest, limits["max_bytes"], limits["max_records"], limits["max_line_bytes"]
    )


body_text = st.lists(
    st.sampled_from(["{}", "", " ", "\t", "\r", "é", "\udcff", '{"a":1}', "x" * 9, "\x00"]),
    max_size=12,
).map("\n".join) | st.just("")


@settings(max_examples=300)
@given(
    text=body_text,
    trailing=st.sampled_from(["", "\n", "\n\n"]),
    damage=st.sampled_from(["none", "truncate", "append", "garbage_tail", "zero_tail"]),
    encoding=st.sampled_from(["gzip", "identity", " GZIP ", None]),
    limits=st.tuples(
        st.integers(1, 120), st.integers(1, 8), st.integers(1, 10)
    ),  # max_bytes, max_records, max_line_bytes
)
def test_a_small_body_read_at_once_gives_what_reading_it_in_steps_gives(
    text: str,
    trailing: str,
    damage: str,
    encoding: str | None,
    limits: tuple[int, int, int],
) -> None:
    """``_body_lines`` reads a small, complete, ASCII body in one step each (inflate, decode,
    split) and any other in steps: for every body (blank lines, non-ASCII and undecodable
    bytes, lines and bodies and counts over each limit, a truncated or doubled gzip stream,
    data after it) it gives the same lines, refusal and digest as the stepwise reader alone."""
    raw = (text + trailing).encode("utf-8", "surrogateescape")
    gzipped = (encoding or "").strip().lower() == "gzip"
    body = gzip.compress(raw) if gzipped else raw
    if damage == "truncate" and len(body) > 4:
        body = body[: len(body) - 4]
    elif damage == "append":
        body += gzip.compress(b"{}") if gzipped else b"\n{}"
    elif damage == "garbage_tail":
        body += b"\x01garbage"
    elif damage == "zero_tail":
        body += b"\0\0"
    expected = _read_lines(_streamed, body, encoding, limits)
    assert _read_lines(protocol._body_lines, body, encoding, limits) == expected


def test_a_daemon_batch_is_read_at_once() -> None:
    """The case the one-step reader is for: a daemon's batch, read at once, to the same lines
    and digest as the stepwise reader gives."""
    key = DeviceKey.generate()
    records = chain(key, 40)
    batch = protocol.encode_batch(TERMINAL, records, sign=key.sign)
    limits = (protocol.MAX_BATCH_BYTES, protocol.MAX_BATCH_RECORDS, protocol.MAX_LINE_BYTES)
    assert protocol._small_body_lines(batch.body, "gzip", *limits) is not None
    fast = _read_lines(protocol._body_lines, batch.body, "gzip", limits)
    assert fast == _read_lines(_streamed, batch.body, "gzip", limits)
    assert len(fast[0]) == 40
