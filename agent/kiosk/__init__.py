"""The kiosk front end (信息亭, issue 10): a touch page on 127.0.0.1 over a small JSON API that
drives the online load (:mod:`agent.tap.load`) and, for utility bills (一帐通), the purchase
flow of :mod:`agent.pos`; payment sources are small seams (:mod:`agent.kiosk.payments`).

A bill's purchase is the POS purchase with the order id ``bill-<bill id>``
(:data:`BILL_ORDER_PREFIX`): one order per bill, so the journal never debits a bill twice, and
the clearing host recognises the bill in the signed record it ingests.
"""

from __future__ import annotations

import re

BILL_ORDER_PREFIX = "bill-"
BILL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}")
ACCOUNT = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}")


def bill_order(bill_id: str) -> str:
    """The POS order id of a bill's payment."""
    return BILL_ORDER_PREFIX + bill_id


def bill_of_order(order: object) -> str | None:
    """The bill id an order id names, or ``None`` (not a bill payment)."""
    if not isinstance(order, str) or not order.startswith(BILL_ORDER_PREFIX):
        return None
    bill_id = order[len(BILL_ORDER_PREFIX) :]
    return bill_id if BILL_ID.fullmatch(bill_id) else None
