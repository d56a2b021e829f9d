"""Merchant identity of a terminal (issue 11, merchant-alliance clearing 商盟).

A POS or shop terminal names its merchant in its firmware profile (``[merchant] id`` and
``category``); every purchase record it signs carries both fields (``merchant_id``,
``merchant_category``), so the clearing host can settle per merchant. Pure: no I/O.
"""

from __future__ import annotations

import re

MERCHANT_ID_FIELD = "merchant_id"
MERCHANT_CATEGORY_FIELD = "merchant_category"

# The city plan's fee categories (the host's fee schedule has a rate for each).
CATEGORIES: tuple[str, ...] = (
    "dining",  # dining, hotels, entertainment
    "department_store",  # department stores, supermarkets, chains
    "retail",  # retail, small goods, tobacco, convenience stores
    "tourism",  # tourism and crafts
    "utility",  # utility bill collection (agency commission)
    "other",
)

_MERCHANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def merchant_id_problem(value: object) -> str | None:
    """Why ``value`` is not a merchant id (1..32 of A-Z a-z 0-9 _ . -, first alphanumeric)."""
    if not isinstance(value, str) or _MERCHANT_ID.fullmatch(value) is None:
        return "must be 1..32 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"
    return None


def category_problem(value: object) -> str | None:
    """Why ``value`` is not a merchant category."""
    if not isinstance(value, str) or value not in CATEGORIES:
        return f"must be one of {', '.join(CATEGORIES)}"
    return None
