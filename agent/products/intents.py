"""What every product's recovery shares: typed intent fields and the shape of a decision.

Pure: the tap layer (:mod:`agent.tap.journal`) applies these decisions to the store.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
