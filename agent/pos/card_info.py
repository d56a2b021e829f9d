"""Read the card on the reader without changing it: identity, product, balance, status.

CPU cards: SELECT and the reads of the purse's issuer dialect (no INITIALIZE, nothing that could
cancel or start a transaction). M1 cards: issuance, sector keys through the PSAM, purse and
public info; an interrupted debit is reported (``interrupted``), never repaired here (the next
purchase repairs it under the journal).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, TypeVar

from agent.apdu import Command, Party, Response, parse_response
from agent.errors import CardProtocolError, TapRefused
from agent.products import cpu_purse, m1_purse
from agent.products.m1_purse import M1Session, M1Step, Recovery
from agent.profile import Profile
from agent.readers.base import CardPresence, CardReader, CardTechnology
from agent.readers.storage import StorageCardReader
from agent.tap.context import BlacklistLookup, PrintedLookup, SamRoutes
from agent.tap.m1 import M1Handler, execute

T = TypeVar("T")


def read_card(
    reader: CardReader,
    presence: CardPresence,
    profile: Profile,
    sams: SamRoutes,
    blacklist: BlacklistLookup | None,
    today: dt.date,
) -> dict[str, Any]:
    """What the POS shows of the card in the field (raises AgentError on card/reader faults)."""
    uid = presence.uid.hex().upper()
    if presence.technology is CardTechnology.MIFARE_CLASSIC:
        return _m1(reader, presence, profile, sams, blacklist, today)

    def exchange(command: Command) -> Response:
        return parse_response(reader.transmit(command.to_bytes()), command, Party.CARD)

    def run(step: cpu_purse.Step[T]) -> T:
        return cpu_purse.drive(step, exchange)

    last: str = "no application"
    for app in profile.applications:
        try:
            fci = run(cpu_purse.select_application(app))
        except cpu_purse.ApplicationNotFound as exc:
            last = str(exc)
            continue
        except TapRefused as refused:
            return {
                "uid": uid,
                "technology": "cpu",
                "status": refused.reason,
                "reason": str(refused),
            }
        card = run(cpu_purse.read_card(app, fci, profile.dialects))
        status, reason = "ok", ""
        if blacklist is not None and blacklist.contains(card.card_id):
            status, reason = "blacklisted", "on the blacklist in force"
        elif (
            blacklist is not None
            and isinstance(blacklist, PrintedLookup)
            and blacklist.contains_printed(card.issuer_code, card.printed_number)
        ):
            status, reason = (
                "blacklisted",
                f"printed number {card.printed_number} of issuer {card.issuer_code} on the "
                "blacklist in force",
            )
        else:
            try:
                cpu_purse.qualify(card, profile, today)
            except TapRefused as refused:
                status, reason = refused.reason, str(refused)
        return {
            "uid": uid,
            "technology": "cpu",
            "card_id": card.card_id,
            "printed_number": card.printed_number,
            "issuer_code": card.issuer_code,
            "product": card.family.value,
            "balance": card.balance,
            "valid_from": card.start.isoformat(),
            "valid_until": card.expiry.isoformat(),
            "status": status,
            "reason": reason,
        }
    return {"uid": uid, "technology": "cpu", "status": "unknown_card", "reason": last}


def _m1(
    reader: CardReader,
    presence: CardPresence,
    profile: Profile,
    sams: SamRoutes,
    blacklist: BlacklistLookup | None,
    today: dt.date,
) -> dict[str, Any]:
    uid = presence.uid.hex().upper()
    if not profile.m1_purse or not isinstance(reader, StorageCardReader):
        return {"uid": uid, "technology": "m1", "status": "unknown_card", "reason": "no M1 purse"}
    handler = M1Handler(profile)
    layout = handler.layout

    def run(step: M1Step[T], session: M1Session | None = None) -> T:
        return m1_purse.drive(step, lambda op: execute(reader, op), session)

    uid4 = m1_purse.auth_uid(presence.uid)
    issuance = run(m1_purse.read_issuance(layout, uid4))
    sam = sams.sam_for("m1")
    keys = handler.key_provider(sam).sector_keys(uid4, issuance, layout.sectors_in_use())
    session = M1Session(keys, layout.keys.key_type)
    state = run(m1_purse.read_state(layout, session), session)
    classification = m1_purse.classify(state, layout)
    status, reason = "ok", ""
    if classification.kind is not Recovery.NORMAL:
        status, reason = "interrupted", f"interrupted debit ({classification.kind.value})"
    elif blacklist is not None and blacklist.contains(uid):
        status, reason = "blacklisted", "on the blacklist in force"
    else:
        try:
            m1_purse.qualify(layout, issuance, state, today, profile.max_balance)
        except (TapRefused, CardProtocolError) as exc:
            status, reason = getattr(exc, "reason", "card_damaged"), str(exc)
    return {
        "uid": uid,
        "technology": "m1",
        "card_id": uid,
        "printed_number": issuance.card_number,
        "product": "m1",
        "balance": state.purse_p,
        "valid_from": None if issuance.start_date is None else issuance.start_date.isoformat(),
        "valid_until": None if issuance.expiry_date is None else issuance.expiry_date.isoformat(),
        "status": status,
        "reason": reason,
    }
