"""``cardhost host`` options for online loads: where the loads live and which key store signs.

``--loads-db PATH`` turns the load routes on. Keys: ``--load-keys test`` (the software store
with the test load masters and the TAC master of ``--profile``'s test keys: demo and tests
only) or ``--load-keys pkcs11`` with ``--pkcs11-lib``, ``--pkcs11-token`` and the user PIN in
the environment variable ``--pkcs11-pin-env`` names (never on the command line).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.errors import ConfigurationError
from agent.profile import load_profile
from agent.sam.keys import KeySet
from clearinghost.keystore import KeyStore, SoftwareKeyStore, load_test_keys
from clearinghost.keystore_pkcs11 import Pkcs11KeyStore
from clearinghost.loads import LoadAuthority

DEFAULT_MAX_BALANCE = 100000  # fen; a profile's terminal.max_balance overrides it


def add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads-db", type=Path, help="SQLite file of online loads (圈存)")
    parser.add_argument("--load-keys", choices=("test", "pkcs11"), default="test")
    parser.add_argument("--pkcs11-lib", help="PKCS#11 module, e.g. libsofthsm2.so")
    parser.add_argument("--pkcs11-token", help="token label")
    parser.add_argument(
        "--pkcs11-pin-env", default="CARDHOST_PKCS11_PIN", help="environment variable of the PIN"
    )


def load_authority_from(args: argparse.Namespace) -> LoadAuthority | None:
    path: Path | None = getattr(args, "loads_db", None)
    if path is None:
        return None
    max_balance = DEFAULT_MAX_BALANCE
    keys = KeySet(load_test_keys())
    order = True
    if args.profile is not None:
        profile = load_profile(args.profile)
        max_balance = profile.max_balance
        order = profile.factor_order_card_first
        keys = KeySet([*KeySet.from_mapping(profile.test_keys or {"keys": []}), *keys])
    store: KeyStore
    if args.load_keys == "pkcs11":
        pin = os.environ.get(args.pkcs11_pin_env)
        if not args.pkcs11_lib or not args.pkcs11_token or not pin:
            raise ConfigurationError(
                f"--load-keys pkcs11 needs --pkcs11-lib, --pkcs11-token and ${args.pkcs11_pin_env}"
            )
        store = Pkcs11KeyStore(args.pkcs11_lib, args.pkcs11_token, pin, apdu_order_card_first=order)
    else:
        store = SoftwareKeyStore(keys, apdu_order_card_first=order)
    return LoadAuthority(path, store, max_balance=max_balance)
