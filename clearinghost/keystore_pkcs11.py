"""The key store on a PKCS#11 token (SoftHSM2 in CI, an HSM in production).

3DES masters are secret-key objects of the token, ``CKA_SENSITIVE`` and not extractable; every
step runs on the token's mechanisms and no key value ever reaches host memory for a load:

* diversification ``Div3DES(MK, F) = 3DES_MK(F) ‖ 3DES_MK(¬F)`` (§5.4) is
  ``C_DeriveKey(CKM_DES3_ECB_ENCRYPT_DATA, F ‖ ¬F)``, a DES2 session key, level by level;
* ``SESLK = 3DES_DLK(random4 ‖ ctr2 ‖ 80 00)`` (§5.6) is the same derivation over that block
  three times: the DES3 key ``S ‖ S ‖ S`` computes single DES under ``S``;
* the PBOC DES MAC (§5.3) is ``C_Encrypt(CKM_DES3_CBC, pad80(data), IV 0)``, last block.

Limit: the TAC key is ``DTK_L ⊕ DTK_R`` (§5.5), an XOR SoftHSM2 cannot do inside the token, so
the card-level DTK (one card's key, never the master) is derived extractable for the TAC check.

SoftHSM2 has no SM4. SM4 masters are kept in the token as data objects holding the master
encrypted under the token's AES wrapping key (``CKA_SENSITIVE``, not extractable); only
:class:`_Sm4Unwrapper` turns one back into bytes, for one computation, and drops it.
"""

from __future__ import annotations

import ctypes
import hmac
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pkcs11
from pkcs11 import DEFAULT, Attribute, KeyType, Mechanism, ObjectClass

from agent import crypto
from agent.crypto import Algorithm
from agent.sam.keys import MasterKey
from clearinghost.keystore import CardKeyRef, KeyStoreError, software_load_tac, software_session

WRAP_LABEL = "cardagent-wrap"


def master_label(usage: str, index: int, algorithm: Algorithm) -> str:
    return f"cardagent-{usage}-{index}-{algorithm.name}"


def _derivation_param(data: bytes) -> tuple[Any, bytes]:
    """``CK_KEY_DERIVATION_STRING_DATA`` for ``CKM_DES3_ECB_ENCRYPT_DATA`` (python-pkcs11 passes
    bytes through as the raw parameter); the buffer must outlive the call."""
    buffer = ctypes.create_string_buffer(data, len(data))
    return buffer, struct.pack("@PL", ctypes.addressof(buffer), len(data))


class _Sm4Unwrapper:
    """The only place an SM4 master exists outside the token, for one computation."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self._key: Any = None

    def _wrapping_key(self) -> Any:
        if self._key is None:  # the handle (never the value) is kept for the session
            self._key = self.session.get_key(label=WRAP_LABEL)
        return self._key

    def wrap(self, master16: bytes) -> bytes:
        key = self._wrapping_key()
        iv = bytes(16)
        return bytes(key.encrypt(master16, mechanism=Mechanism.AES_CBC, mechanism_param=iv))

    @contextmanager
    def master(self, blob: bytes) -> Iterator[bytes]:
        key = self._wrapping_key()
        value = bytearray(key.decrypt(blob, mechanism=Mechanism.AES_CBC, mechanism_param=bytes(16)))
        try:
            yield bytes(value)
        finally:
            value[:] = bytes(len(value))


def reread_library_configuration(library: str) -> None:
    """Make the PKCS#11 library read its configuration again (SoftHSM2: ``SOFTHSM2_CONF``,
    its token directory). A library reads it once, when it is initialised in a process; a
    process that points it at another token directory (a test's or a benchmark's own token)
    calls this first. Sessions opened before are invalid afterwards."""
    lib = pkcs11.lib(library)
    if lib.initialized:
        lib.reinitialize()


class Pkcs11KeyStore:
    """:class:`clearinghost.keystore.KeyStore` on a PKCS#11 token."""

    def __init__(
        self,
        library: str,
        token_label: str,
        pin: str,
        *,
        levels: int = 2,
        apdu_order_card_first: bool = True,
        sm4_load_session_key: str = "pad80",
    ) -> None:
        self.token = pkcs11.lib(library).get_token(token_label=token_label)
        self.session = self.token.open(user_pin=pin, rw=True)
        self.levels = levels
        self.order = apdu_order_card_first
        self.sm4_variant = sm4_load_session_key
        self._sm4 = _Sm4Unwrapper(self.session)
        # object handles found by label, kept for the session (a token search per call costs
        # more than the cryptography); handles, never key values
        self._handles: dict[str, Any] = {}

    def close(self) -> None:
        self.session.close()

    # -- provisioning (test keys and the demo; production imports masters under a KEK) -----

    def create_wrapping_key(self) -> None:
        self.session.generate_key(
            KeyType.AES,
            128,
            label=WRAP_LABEL,
            store=True,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )

    def import_master(self, master: MasterKey) -> None:
        label = master_label(master.usage, master.index, master.algorithm)
        if master.algorithm == Algorithm.SM4:
            self.session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.LABEL: label,
                    Attribute.VALUE: self._sm4.wrap(master.key),
                }
            )
            return
        self.session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.DES2,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.LABEL: label,
                Attribute.VALUE: master.key,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.DERIVE: True,
                Attribute.ENCRYPT: False,
            }
        )

    # -- 3DES on the token -----------------------------------------------------------------

    def _master_key(self, usage: str, index: int, algorithm: Algorithm) -> Any:
        label = master_label(usage, index, algorithm)
        if label not in self._handles:
            try:
                self._handles[label] = self.session.get_key(label=label)
            except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned) as exc:
                raise KeyStoreError(f"PKCS#11 token: no single master {label!r}") from exc
        return self._handles[label]

    def _derive(self, base: Any, data: bytes, key_type: Any, *, extractable: bool = False) -> Any:
        _buffer, param = _derivation_param(data)
        return base.derive_key(
            key_type,
            192 if key_type == KeyType.DES3 else 128,
            mechanism=Mechanism.DES3_ECB_ENCRYPT_DATA,
            mechanism_param=param,
            store=False,
            template={
                Attribute.VALUE_LEN: DEFAULT,
                Attribute.SENSITIVE: not extractable,
                Attribute.EXTRACTABLE: extractable,
                Attribute.DERIVE: True,
                Attribute.ENCRYPT: True,
            },
        )

    def _card_key(self, master: Any, factors: Sequence[bytes], *, extractable: bool = False) -> Any:
        if len(factors) < self.levels:
            raise KeyStoreError(f"PKCS#11 token: {self.levels} factors needed, got {len(factors)}")
        chosen = list(factors[: self.levels])
        ordered = list(reversed(chosen)) if self.order else chosen
        key = master
        for n, factor in enumerate(ordered):
            last = n == len(ordered) - 1
            complement = bytes(b ^ 0xFF for b in factor)
            key = self._derive(
                key, factor + complement, KeyType.DES2, extractable=extractable and last
            )
        return key

    def _session_mac_3des(
        self, ref: CardKeyRef, random4: bytes, counter: int, data: bytes
    ) -> bytes:
        dlk = self._card_key(self._master_key(ref.usage, ref.index, ref.algorithm), ref.factors)
        block = random4 + counter.to_bytes(2, "big") + b"\x80\x00"
        seslk = self._derive(dlk, block * 3, KeyType.DES3)
        cipher = seslk.encrypt(
            crypto.pad80(data), mechanism=Mechanism.DES3_CBC, mechanism_param=bytes(8)
        )
        return bytes(cipher[-8:-4])

    # -- SM4 through the unwrapper -------------------------------------------------------

    def _sm4_master(self, usage: str, index: int) -> bytes:
        label = master_label(usage, index, Algorithm.SM4)
        if label not in self._handles:
            found = list(
                self.session.get_objects(
                    {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label}
                )
            )
            if len(found) != 1:
                raise KeyStoreError(f"PKCS#11 token: no single wrapped SM4 master {label!r}")
            self._handles[label] = found[0]
        return bytes(self._handles[label][Attribute.VALUE])

    def _mac(self, ref: CardKeyRef, random4: bytes, counter: int, data: bytes) -> bytes:
        if ref.algorithm == Algorithm.TDES:
            return self._session_mac_3des(ref, random4, counter, data)
        blob = self._sm4_master(ref.usage, ref.index)
        with self._sm4.master(blob) as value:
            master = MasterKey(ref.usage, ref.index, 1, Algorithm.SM4, self.levels, value)
            session = software_session(
                master, ref.factors, random4, counter, self.order, self.sm4_variant
            )
        return crypto.session_mac(session, data, Algorithm.SM4)

    # -- KeyStore --------------------------------------------------------------------------

    def load_mac1_ok(
        self, ref: CardKeyRef, random4: bytes, counter: int, mac1: bytes, data: bytes
    ) -> bool:
        return hmac.compare_digest(self._mac(ref, random4, counter, data), mac1)

    def load_mac2(self, ref: CardKeyRef, random4: bytes, counter: int, data: bytes) -> bytes:
        return self._mac(ref, random4, counter, data)

    def load_tac(
        self,
        factors: Sequence[bytes],
        new_balance: int,
        counter: int,
        amount: int,
        terminal6: bytes,
        datetime7: bytes,
        algorithm: Algorithm,
    ) -> bytes:
        del algorithm  # the TAC master is 3DES (an SM4 card borrows it, as in the simulator)
        master = self._master_key("tac", 1, Algorithm.TDES)
        dtk = bytes(self._card_key(master, factors, extractable=True)[Attribute.VALUE])
        return software_load_tac(dtk, new_balance, counter, amount, terminal6, datetime7)
