"""Master keys held by a (software) PSAM, parsed from a test profile's ``test_keys.keys`` list.

A PSAM stores only masters and diversifies them per card (cpu-purse.md §5.5); §8 models its key
table as {(usage type, index) -> (levels N, algorithm, 16-byte master)}. A purchase key is chosen
by (key version, algorithm id) from the card's INIT answer (§4.2), so that pair must be unique per
usage too. Key bytes never appear in ``repr``, ``str`` or error messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.crypto import Algorithm
from agent.errors import ConfigurationError

USAGES = frozenset({"purchase", "tac", "maintenance", "load"})
"""Key usages. ``load`` (DLK master) is only used by the card simulator: terminals hold no load
key (§5.5)."""

KEY_LENGTH = 16
MAX_LEVELS = 3  # Lc of 80 70 is 14 + 8N with N = 1..3 (§4.2)


@dataclass(frozen=True, slots=True)
class MasterKey:
    """One master key of the PSAM key table (§8)."""

    usage: str
    index: int
    version: int
    algorithm: Algorithm
    levels: int
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.usage not in USAGES:
            raise ConfigurationError(
                f"key usage must be one of {sorted(USAGES)}, got {self.usage!r}"
            )
        for name, value, top in (("index", self.index, 0xFF), ("version", self.version, 0xFF)):
            if not 0 <= value <= top:
                raise ConfigurationError(f"key {name} must be in 0..{top}, got {value}")
        if not 0 <= self.levels <= MAX_LEVELS:
            raise ConfigurationError(f"key levels must be in 0..{MAX_LEVELS}, got {self.levels}")
        if len(self.key) != KEY_LENGTH:
            raise ConfigurationError(
                f"{self.label}: key must be {KEY_LENGTH} bytes, got {len(self.key)}"
            )

    @property
    def label(self) -> str:
        """Identifies the key in logs and errors without revealing it."""
        return (
            f"{self.usage} key index {self.index} version {self.version} "
            f"{self.algorithm.name} ({self.levels}-level)"
        )

    def __repr__(self) -> str:
        return (
            f"MasterKey(usage={self.usage!r}, index={self.index}, version={self.version}, "
            f"algorithm={self.algorithm.name}, levels={self.levels}, key=<redacted>)"
        )

    __str__ = __repr__


class KeySet:
    """An immutable table of master keys.

    Unique per (usage, index, algorithm) and per (usage, version, algorithm): the same index may
    hold a 3DES and an SM4 key (ETC cards, §3.1, S8).
    """

    def __init__(self, keys: Iterable[MasterKey] = ()) -> None:
        self._keys: tuple[MasterKey, ...] = tuple(keys)
        self._by_index: dict[tuple[str, int, Algorithm], MasterKey] = {}
        self._by_version: dict[tuple[str, int, Algorithm], MasterKey] = {}
        for key in self._keys:
            idx = (key.usage, key.index, key.algorithm)
            if idx in self._by_index:
                raise ConfigurationError(
                    f"duplicate key: {key.usage} index {key.index} {key.algorithm.name}"
                )
            ver = (key.usage, key.version, key.algorithm)
            if ver in self._by_version:
                raise ConfigurationError(
                    f"duplicate key: {key.usage} version {key.version} {key.algorithm.name}"
                )
            self._by_index[idx] = key
            self._by_version[ver] = key

    @classmethod
    def from_mapping(cls, data: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> KeySet:
        """Parse the list under ``test_keys.keys`` (or a mapping holding it under ``keys``).

        Each entry: ``usage``, ``index``, ``version``, ``algorithm`` (0 = 3DES, 4 = SM4),
        ``levels`` and ``key`` (32 hex digits). Raises :class:`ConfigurationError`.
        """
        entries: Any = data
        if isinstance(data, Mapping):
            entries = data.get("keys")
            if entries is None:
                raise ConfigurationError("test_keys: missing field 'keys'")
        if isinstance(entries, str | bytes) or not isinstance(entries, Sequence):
            raise ConfigurationError(f"test_keys.keys must be a list of tables, got {entries!r}")
        return cls(_parse_entry(i, entry) for i, entry in enumerate(entries))

    def __iter__(self) -> Iterator[MasterKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeySet({', '.join(k.label for k in self._keys)})"

    def by_index(
        self, usage: str, index: int, algorithm: Algorithm | None = None
    ) -> MasterKey | None:
        """The key of ``usage`` at ``index``; without ``algorithm`` 3DES is preferred over SM4."""
        if algorithm is not None:
            return self._by_index.get((usage, index, algorithm))
        for alg in sorted(Algorithm):
            key = self._by_index.get((usage, index, alg))
            if key is not None:
                return key
        return None

    def by_version(self, usage: str, version: int, algorithm: Algorithm) -> MasterKey | None:
        """The key of ``usage`` with key version ``version`` and ``algorithm`` (80 70, §4.2)."""
        return self._by_version.get((usage, version, algorithm))

    def of_usage(self, usage: str, algorithm: Algorithm | None = None) -> tuple[MasterKey, ...]:
        """All keys of ``usage`` (optionally of one algorithm), by ascending index."""
        return tuple(
            sorted(
                (
                    k
                    for k in self._keys
                    if k.usage == usage and (algorithm is None or k.algorithm == algorithm)
                ),
                key=lambda k: k.index,
            )
        )


_FIELDS = ("usage", "index", "version", "algorithm", "levels", "key")


def _parse_entry(position: int, entry: Any) -> MasterKey:
    where = f"test_keys.keys[{position}]"
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where} must be a table, got {type(entry).__name__}")
    missing = [name for name in _FIELDS if name not in entry]
    if missing:
        raise ConfigurationError(f"{where}: missing field(s) {', '.join(missing)}")
    usage = entry["usage"]
    if not isinstance(usage, str) or usage not in USAGES:
        raise ConfigurationError(f"{where}: 'usage' must be one of {sorted(USAGES)}, got {usage!r}")
    ints: dict[str, int] = {}
    for name in ("index", "version", "algorithm", "levels"):
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{where}: '{name}' must be an integer, got {value!r}")
        ints[name] = value
    try:
        algorithm = Algorithm(ints["algorithm"])
    except ValueError as exc:
        options = ", ".join(f"{a.value} ({a.name})" for a in Algorithm)
        raise ConfigurationError(
            f"{where}: 'algorithm' must be one of {options}, got {ints['algorithm']}"
        ) from exc
    text = entry["key"]
    if not isinstance(text, str):
        raise ConfigurationError(f"{where}: 'key' must be a hex string")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        # The message must not echo the (possibly almost valid) key material.
        raise ConfigurationError(f"{where}: 'key' is not valid hex") from None
    if len(key) != KEY_LENGTH:
        raise ConfigurationError(
            f"{where}: 'key' must be {KEY_LENGTH} bytes ({2 * KEY_LENGTH} hex digits), "
            f"got {len(key)} bytes"
        )
    try:
        return MasterKey(
            usage=usage,
            index=ints["index"],
            version=ints["version"],
            algorithm=algorithm,
            levels=ints["levels"],
            key=key,
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
