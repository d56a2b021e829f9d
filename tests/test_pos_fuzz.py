"""The POS API fuzzed from its own OpenAPI document (``agent/pos/openapi.json``): schemathesis
sends documented (positive) and undocumented (negative) requests to a real ``cardagent pos``
server on 127.0.0.1 with a card on the emulated reader module. Every answer must be documented
(status, media type, body schema) and none may be a 5xx. Hypothesis runs without deadlines and
with a bounded number of examples per operation (``CARDAGENT_FUZZ_EXAMPLES``, default 15).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fake_reader.scenario import make_card
from tests.pos_stack import Field, PosStack

EXAMPLES = int(os.environ.get("CARDAGENT_FUZZ_EXAMPLES", "15"))
OPENAPI = Path(__file__).resolve().parents[1] / "agent" / "pos" / "openapi.json"
CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SCHEMA = schemathesis.openapi.from_path(str(OPENAPI))
assert all(isinstance(result, Ok) for result in SCHEMA.get_all_operations()), "openapi.json"
OPERATIONS = sorted(
    (result.ok() for result in SCHEMA.get_all_operations() if isinstance(result, Ok)),
    key=lambda op: (op.method.upper() != "POST", op.label),
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    field = Field()
    stack = PosStack(tmp_path_factory.mktemp("pos-fuzz"), field)
    card = make_card("tunion", 1, field.keyset, balance=100_000)
    field.present(card)  # a card lies on the reader: no request waits for one
    try:
        paid = stack.pos.purchase("FUZZ-1", 100).json()
        assert paid["status"] == "paid", paid
        yield stack.url
    finally:
        stack.close()
        field.close()


def has_inputs(operation: Any) -> bool:
    raw = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))


CASES = [
    pytest.param(operation, mode, id=f"{operation.label}-{mode}")
    for operation in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or has_inputs(operation)
]


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_every_answer_is_documented_and_none_is_a_5xx(
    served: str, operation: Any, mode: GenerationMode
) -> None:
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=served, session=session, timeout=120)
        case.validate_response(response, checks=CHECKS)

    with session:
        run()
