"""Blacklist lock of an M1 purse: the public-info blacklist flag (m1-purse-and-readers.md §3.1).

::

    (card read, classified and repaired to NORMAL; this card's pending debit intent resolved)
      ─► plan: pubP with byte 6 = blacklist value (0x04; the inverted backup then holds 0xFB)
      ─► store INTENT {op: lock}, durable          ◄── nothing is written to the card before this
      ─► write pubP, read back; write pubB (the layout's backup encoding + check), read back
      ─► INTENT → ``lock`` RECORD ─► refuse the tap ("blacklisted")

A step in the style of :mod:`agent.products.m1_purse`: it yields storage-card operations and
receives their results. Only the two public-info blocks are written; the purse value blocks,
the records and the counter are never touched, so a lock never changes money and the §3.5
debit rules see the same counter and balances before and after it.

Tearing (§1.5, three modes). The primary is written first, then the backup:

==============  =====================================  ==========================================
torn write      card afterwards                        next tap
==============  =====================================  ==========================================
pubP nothing    unchanged                              normal, flag clear: intent voided, re-lock
pubP garbage    pubP invalid, pubB old                 rule A (pubB → pubP): flag clear, as above
pubP lost       pubP flagged, pubB old                 rule ``flag`` (pubP → pubB): flag set
pubB nothing    pubP flagged, pubB old                 rule ``flag`` (pubP → pubB): flag set
pubB garbage    pubP flagged, pubB invalid             rule ``pubB`` (pubP → pubB): flag set
pubB lost       both flagged                           normal, flag set
==============  =====================================  ==========================================

Flag set with this card's lock intent pending: the intent becomes the lock record (one record,
``recovered``); flag clear: the intent is voided (the lock did not happen) and, if the card is
still listed, locked again. So a tear ends with either no flag and no record, or the flag and
exactly one record. The ``flag`` rule lives in :func:`agent.products.m1_purse.classify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.errors import CardProtocolError
from agent.offline_store.records import RecordBody
from agent.products.m1_codec import Issuance, PublicInfo
from agent.products.m1_layout import M1Layout
from agent.products.m1_purse import (
    Classification,
    M1Session,
    M1Step,
    PurseState,
    _ensure,
    _write_checked,
    encode_public,
)

LOCK_OP = "lock"
REASON_BLACKLISTED = "blacklisted"


@dataclass(frozen=True, slots=True)
class LockPlan:
    """The public info before the lock and after it (byte 6 = the layout's blacklist value)."""

    public_before: PublicInfo
    public_after: PublicInfo
    balance: int

    @property
    def flag(self) -> int:
        return self.public_after.blacklist


def is_flagged(layout: M1Layout, info: PublicInfo | None) -> bool:
    """Public-info byte 6 holds the blacklist value (§3.1: 0x04; decoded, so also for an
    inverted backup that stores 0xFB)."""
    return info is not None and info.blacklist == layout.blacklist_value


def plan_lock(layout: M1Layout, state: PurseState) -> LockPlan:
    """The lock of a consistent card: both public copies become pubP with the flag set."""
    pub_p, pub_b = state.pub_p, state.pub_b
    if pub_p is None or pub_b is None or state.purse_p is None or state.purse_p != state.purse_b:
        raise CardProtocolError("a lock needs a consistent card (classified and repaired)")
    if pub_p.key_fields() != pub_b.key_fields() or not layout.is_done(pub_p.flag):
        raise CardProtocolError("a lock needs both public-info copies equal and done")
    return LockPlan(
        public_before=pub_p,
        public_after=pub_p.with_(blacklist=layout.blacklist_value),
        balance=state.purse_p,
    )


def set_blacklist_flag(layout: M1Layout, session: M1Session, plan: LockPlan) -> M1Step[None]:
    """Write the flag into pubP, then pubB, each read back and compared (§3.5 rule 1).

    The backup is encoded as the layout says (a copy, or inverted: byte 6 then reads 0xFB,
    §3.1) with the layout's checksum. Primary first, so that a half-written pair has the new
    flag in pubP, which the ``flag`` recovery rule copies to pubB.
    """
    pp_blk, pb_blk = layout.public_blocks
    yield from _ensure(session, layout.public_sector)
    yield from _write_checked(pp_blk, encode_public(layout, plan.public_after, backup=False))
    yield from _write_checked(pb_blk, encode_public(layout, plan.public_after, backup=True))


def lock_payload(
    layout: M1Layout,
    plan: LockPlan,
    *,
    uid: bytes,
    uid4: bytes,
    issuance: Issuance,
    profile: str,
    terminal: bytes,
    sam: str,
    when: str,
) -> dict[str, Any]:
    """The intent journaled before the flag is written (``op`` = ``lock``; amount 0)."""
    return {
        "op": LOCK_OP,
        "family": "m1",
        "uid": uid.hex().upper(),
        "uid4": uid4.hex().upper(),
        "city": issuance.city_code.hex().upper(),
        "serial": issuance.serial.hex().upper(),
        "card_number": issuance.card_number,
        "card_type": issuance.card_type,
        "profile": profile,
        "blacklist_flag": layout.blacklist_value,
        "public_backup_encoding": layout.public_backup_encoding,
        "check": layout.check,
        "counter": plan.public_before.counter,
        "balance": plan.balance,
        "amount": 0,
        "terminal": terminal.hex().upper(),
        "sam": sam,
        "datetime": when,
    }


def is_lock_intent(payload: dict[str, Any]) -> bool:
    return payload.get("op") == LOCK_OP


def lock_record_body(
    card_id: str,
    payload: dict[str, Any],
    recovery: Classification | None = None,
    reason: str = REASON_BLACKLISTED,
) -> RecordBody:
    """The record a lock leaves: kind ``lock``, product ``m1``, amount 0 (as
    :func:`agent.products.cpu_lock.lock_record_body` for CPU cards)."""
    fields: dict[str, str | int | bool | None] = {"product": "m1"}
    for key in (
        "family",
        "uid",
        "uid4",
        "city",
        "serial",
        "card_number",
        "card_type",
        "profile",
        "blacklist_flag",
        "public_backup_encoding",
        "check",
        "counter",
        "balance",
        "terminal",
        "sam",
        "datetime",
    ):
        value = payload.get(key)
        fields[key] = value if isinstance(value, str | int | bool) or value is None else str(value)
    fields["reason"] = reason
    fields["recovered"] = recovery is not None
    fields["recovery"] = "" if recovery is None else recovery.kind.value
    return RecordBody(kind="lock", card_id=card_id, amount=0, fields=fields)
