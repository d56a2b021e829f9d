"""What every product's recovery shares: typed intent fields and the shape of a decision.

Pure: the tap layer (:mod:`agent.tap.journal`) applies these decisions to the store.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

OP_PURCHASE = "purchase"
OP_LOCK = "lock"


class Verdict(enum.Enum):
    VOID = "void"  # the evidence proves the operation did not happen
    FINALIZE = "finalize"  # it proves the operation happened: the intent becomes its record
    UNRESOLVED = "unresolved"  # neither: the clearing centre decides from the record


@dataclass(frozen=True, slots=True)
class Decision:
    """A product's judgement of one pending intent against what the card shows now.

    ``card_fault``: the card contradicts itself (a counter went back, a balance moved the wrong
    way); the tap must stop after the intent is settled.
    """

    verdict: Verdict
    reason: str
    card_fault: str = ""


class IntentPayloadError(ValueError):
    """A stored intent payload lacks a field or holds a value of the wrong type."""


def intent_op(payload: Mapping[str, Any]) -> str:
    """What the intent journals: ``purchase`` (also every intent written before ``op`` existed
    for purchases) or ``lock``."""
    op = payload.get("op", OP_PURCHASE)
    return op if isinstance(op, str) else ""


def field_int(payload: Mapping[str, Any], key: str) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise IntentPayloadError(f"intent field {key!r} is {value!r}")
    try:
        return int(value)
    except ValueError as exc:
        raise IntentPayloadError(f"intent field {key!r} is {value!r}") from exc


def field_str(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str):
        raise IntentPayloadError(f"intent field {key!r} is {value!r}")
    return value


def to_payload(op: str, intent: Any) -> dict[str, Any]:
    """The stored payload of a typed intent (a dataclass of ``int`` and ``str`` fields)."""
    return {"op": op, **{f.name: getattr(intent, f.name) for f in dataclasses.fields(intent)}}


def from_payload(cls: type[T], op: str, payload: Mapping[str, Any]) -> T:
    """A typed intent from its stored payload; :class:`IntentPayloadError` names the first bad
    field. A field with a default may be absent (intents written by an older agent)."""
    if intent_op(payload) != op:
        raise IntentPayloadError(f"not a {op} intent: op {payload.get('op')!r}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if payload.get(f.name) is None and f.default is not dataclasses.MISSING:
            continue
        values[f.name] = (
            field_int(payload, f.name) if f.type == "int" else field_str(payload, f.name)
        )
    return cls(**values)
