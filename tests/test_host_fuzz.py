"""The host's HTTP API fuzzed from its own OpenAPI document (issue 9: undocumented answers,
500s from inputs nobody tried).

schemathesis generates requests for every documented operation, both data that fits the
document (positive) and data that does not (negative), sent without credentials, as a viewer and
as an operator, to a real host (uvicorn) on 127.0.0.1 with a registered terminal, stored
records, a parameter set and a held blacklist change. Every answer must be documented (status,
media type, body schema) and none may be a 5xx. Hypothesis runs without deadlines and with a
bounded number of examples per operation (``CARDAGENT_FUZZ_EXAMPLES``, default 15).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agent.offline_store import DeviceKey, RecordBody
from agent.offline_store.records import GENESIS_HASH, seal_record
from agent.sam.keys import KeySet
from clearinghost.keys import HostKey
from clearinghost.keystore import SoftwareKeyStore, load_test_keys
from clearinghost.loads import LoadAuthority
from clearinghost.operators import OPERATOR, VIEWER, Operator, Operators, hash_token
from clearinghost.server import OPENAPI_PATH, ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage
from sync import protocol
from tests.fake_reader.scenario import demo_keyset

EXAMPLES = int(os.environ.get("CARDAGENT_FUZZ_EXAMPLES", "15"))
TERMINAL = "BUS-FUZZ"
TOKENS = {"operator": "fuzz-operator-token-0123456789", "viewer": "fuzz-viewer-token-0123456789"}
CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def json_lines(ctx: Any, value: Any) -> bytes:
    """A generated upload body: the generated record as one JSON line (uncompressed)."""
    return (json.dumps(value) + "\n").encode()


schemathesis.serializer("application/x-ndjson")(json_lines)


SCHEMA = schemathesis.openapi.from_path(str(OPENAPI_PATH))
assert all(isinstance(result, Ok) for result in SCHEMA.get_all_operations()), "openapi.json"
# writes first, so the reads that follow serve what the fuzzed writes stored
OPERATIONS = sorted(
    (result.ok() for result in SCHEMA.get_all_operations() if isinstance(result, Ok)),
    key=lambda op: (op.method.upper() != "POST", op.label),
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    operators = Operators(
        [
            Operator("alice", OPERATOR, hash_token(TOKENS["operator"])),
            Operator("bob", OPERATOR, hash_token("fuzz-bob-token-0123456789")),
            Operator("wall", VIEWER, hash_token(TOKENS["viewer"])),
        ]
    )
    host = ClearingHost(
        SqliteStorage(root / "host.db"),
        HostKey.generate(),
        operators=operators,
        approval_threshold=3,
        loads=LoadAuthority(
            root / "loads.db",
            SoftwareKeyStore(KeySet([*demo_keyset(), *load_test_keys()])),
            max_balance=100000,
        ),
    )
    device = DeviceKey.generate()
    host.storage.register_terminal(TERMINAL, device.public_key_bytes.hex())
    previous, records = GENESIS_HASH, []
    for seq in (1, 2, 3):
        record = seal_record(
            seq=seq,
            created_at="2024-01-01T00:00:00.000Z",
            terminal_id=TERMINAL,
            body=RecordBody("unresolved", "03105170070100000009", 200, {"product": "test"}),
            prev_hash=previous,
            sign=device.sign,
        )
        previous = record.hash
        records.append(record)
    host.storage.publish_params({"fare_table": {"flat_fare": 200}})
    host.storage.publish_blacklist([1, 2], [])
    host.storage.propose_blacklist(list(range(10, 20)), [], "bob")
    with HostServer(create_app(host), log_level="critical") as server:
        batch = protocol.encode_batch(TERMINAL, records)
        stored = httpx.post(
            server.url + protocol.records_path(TERMINAL),
            content=batch.body,
            headers={
                "Content-Encoding": "gzip",
                protocol.IDEMPOTENCY_HEADER: batch.idempotency_key,
            },
        )
        assert stored.status_code == 200, stored.text
        yield server.url
    host.storage.close()


def fuzz(operation: Any, mode: GenerationMode, url: str, who: str) -> None:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who in TOKENS else {}
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode), known=st.booleans())
    def run(case: Any, known: bool) -> None:
        if known and "terminal_id" in (case.path_parameters or {}):
            case.path_parameters["terminal_id"] = TERMINAL  # reach past the unknown-terminal 404
        response = case.call(base_url=url, session=session, headers=headers, timeout=60)
        case.validate_response(response, checks=CHECKS, headers=headers)

    with session:
        run()


def has_inputs(operation: Any) -> bool:
    """Whether negative data can be made for ``operation`` (parameters or a body)."""
    raw = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))


def secured(operation: Any) -> bool:
    return bool(operation.definition.raw.get("security"))


CASES = [
    pytest.param(operation, mode, who, id=f"{operation.label}-{mode}-{who}")
    for operation in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    # credentials matter only where the document asks for them
    for who in (("nobody", "viewer", "operator") if secured(operation) else ("nobody",))
    if mode is GenerationMode.POSITIVE or has_inputs(operation)
]


@pytest.mark.parametrize(("operation", "mode", "who"), CASES)
def test_every_answer_is_documented_and_none_is_a_5xx(
    served: str, operation: Any, mode: GenerationMode, who: str
) -> None:
    fuzz(operation, mode, served, who)


def test_the_document_lists_every_route_of_the_app(tmp_path: Path) -> None:
    host = ClearingHost(SqliteStorage(tmp_path / "routes.db"), HostKey.generate())
    app = create_app(host)
    routes = {
        (method.lower(), route.path)  # type: ignore[attr-defined]
        for route in app.routes
        for method in route.methods or ()  # type: ignore[attr-defined]
        if method != "HEAD"
    }
    documented = {(op.method.lower(), op.path) for op in OPERATIONS}
    host.storage.close()
    assert routes == documented
