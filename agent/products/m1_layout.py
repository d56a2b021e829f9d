"""The M1 purse layout of one city, as validated profile data (m1-purse-and-readers.md §3).

Everything in §3 is convention and differs between cities: sector numbers and block roles,
backup encoding (copy / inverted), checksum kind (XOR / CRC8 / CRC16), process-flag values
(01/02 or 11..14), record layout and byte order, key derivation and the TAC input. The
``[m1_purse]`` section of a firmware profile is parsed by :meth:`M1Layout.from_mapping`, which
raises :class:`ConfigurationError` naming the field at fault.

Block positions inside a sector are indexes (0..2, or 0..14 in the big sectors of a 4K card);
:func:`block_number` turns (sector, index) into the absolute block number (§1.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from agent.errors import ConfigurationError
from agent.products.m1_codec import (
    CHECK_KINDS,
    DATE_ENCODINGS,
    BackupEncoding,
    ByteOrder,
    CheckKind,
    DateEncoding,
    DatesFormat,
    IssuanceCheck,
    RecordLayout,
)
from agent.products.trip_layout import (
    FieldEncoding,
    TimeEncoding,
    TripLayout,
    check_trip_layout,
)
from agent.readers.storage import KeyType

SECTORS_1K = 16
SECTORS_4K = 40

KeyProviderKind = Literal["psam_fc", "psam_des", "software_3des", "static"]
KEY_PROVIDERS: tuple[KeyProviderKind, ...] = ("psam_fc", "psam_des", "software_3des", "static")
KeyRole = Literal["purse", "public", "records"]
KEY_ROLES: tuple[KeyRole, ...] = ("purse", "public", "records")
SectorInput = Literal["id", "sector", "id_and_sector"]
SECTOR_INPUTS: tuple[SectorInput, ...] = ("id", "sector", "id_and_sector")
UnsetDates = Literal["refuse", "unlimited"]

TAC_FIELDS = (
    "amount3",  # fare, 3 bytes big-endian
    "date4",  # YYYYMMDD BCD
    "time3",  # hhmmss BCD
    "counter2",  # purse transaction counter after the debit
    "terminal6",  # PSAM terminal number
    "serial4",  # issuer serial of the card
    "ffff",  # two FF bytes
    "balance4",  # balance before, 4 bytes big-endian
    "uid4",  # the 4 UID bytes used for authentication
    "city2",  # city code
)
TAC_FACTORS = ("serial_uid", "city_ff", "uid_uid")
CARDOP_TAC_FIELDS = ("amount3", "date4", "time3", "counter2", "terminal6", "serial4", "ffff")


def block_number(sector: int, index: int) -> int:
    """Absolute block number of block ``index`` of ``sector`` (§1.1, 1K and 4K)."""
    if sector < 32:
        return sector * 4 + index
    return 128 + (sector - 32) * 16 + index


def blocks_in_sector(sector: int) -> int:
    return 4 if sector < 32 else 16


def sector_of(block: int) -> int:
    return block // 4 if block < 128 else 32 + (block - 128) // 16


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """How sector keys are obtained (§3.3).

    Every sector a tap authenticates (:meth:`M1Layout.sectors_in_use`) has a key id: the
    application id sent to the PSAM (not the raw sector number, §3.3). ``role_ids`` gives one
    per role (purse / public / records: every record sector shares it); ``sector_ids`` overrides
    it per sector number, for issuers whose record sectors have keys of their own.
    ``sector_input`` says what identifies a sector in the diversification input: its key id
    (CARDOP, AFC), its sector number instead, or both (the latter two are not in the spec [L]).
    """

    provider: KeyProviderKind = "psam_fc"
    key_type: KeyType = KeyType.A
    role_ids: Mapping[KeyRole, int] = field(
        default_factory=lambda: {"purse": 0x02, "public": 0x06, "records": 0x03}
    )
    sector_ids: Mapping[int, int] = field(default_factory=dict)
    sector_input: SectorInput = "id"
    issuance_key: str = "uid"  # "uid" = UID ‖ UID[0:2]; else 12 hex digits
    fc_p1: int = 0x01
    fc_p2: int = 0x01
    fc_batch: bool = True  # all sector ids in one 80 FC (AFC) or one call each (CARDOP)
    fc_suffix: Literal["none", "city_ff"] = "none"  # the Lc 0x15 variant appends city ‖ FF×6
    des_p1: int = 0x05  # UNCONFIRMED 80 1A key usage for M1 key derivation [L]
    des_p2: int = 0x01
    software_master: bytes = field(default=b"", repr=False)  # test profiles only
    static_roles: Mapping[KeyRole, bytes] = field(default_factory=dict, repr=False)
    static_sectors: Mapping[int, bytes] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class ValidityConfig:
    """Where the issuance sector keeps the card's dates (§3.1 block 1) and what an unset date
    (all 00 / all FF) means. Offsets and encoding are not in the spec [L]."""

    block: int = 1  # index in the issuance sector
    dates: DatesFormat = field(default_factory=DatesFormat)
    unset: UnsetDates = "refuse"  # refuse a card whose configured date is unset, or no limit


@dataclass(frozen=True, slots=True)
class TacConfig:
    """Record TAC through the PSAM: 80 1A P1 P2 factors, then 80 FA 05 00 (§3.3, CARDOP)."""

    enabled: bool = True
    p1: int = 0x06
    p2: int = 0x00
    factors: tuple[str, ...] = ()
    fields: tuple[str, ...] = CARDOP_TAC_FIELDS
    prefix_iv: bool = True  # the Sam seam's 80 FA takes IV ‖ padded data


# The M1 trip block (issue 13): what a boarding-and-alighting fare needs of the card's last
# trip, in one 16-byte block. §3.1 puts "last-trip information for transfer discounts (time 7,
# line 3, device 4, checksum)" in public-info sector 6 block 2 (AFC); its bytes are not given
# beyond that, and that layout has no record type, stop or amount, so this default is the
# project's own, laid out with the CPU cards' TripLayout (agent.products.cpu_logs parses and
# builds both): type (EF1E codes: 03 boarding, 04 alighting, 06 single) | line (2, binary) |
# stop (2) | time (4, seconds since 2000) | the trip's paid amount (3) | transfer origin (2,
# line + 1, 0: none) | acceptor city code (2, BCD).
M1_TRIP = TripLayout(
    sfi=0, record_length=16, records=1, by_identifier=False, identifier=0,
    write_p1=0, write_p2=0, header=b"", record_type=0x06, type_at=0,
    terminal_at=-1, terminal_length=0, industry_at=-1,
    line_at=1, line_length=2, line_encoding=FieldEncoding.BINARY,
    station_at=3, station_length=2, vehicle_at=-1, vehicle_length=0,
    amount_at=9, balance_at=-1, time_at=5, time_encoding=TimeEncoding.SECONDS_2000,
    city_at=14, institution_at=-1, institution_length=0, institution_code_length=0,
    amount_length=3, transfer_at=12, transfer_length=2,
)  # fmt: skip
TRIP_OVERRIDES = frozenset(
    {
        "record_type", "type_at", "line_at", "line_length", "line_encoding", "station_at",
        "station_length", "amount_at", "amount_length", "balance_at", "time_at",
        "time_encoding", "city_at", "transfer_at", "transfer_length", "terminal_at",
        "terminal_length", "vehicle_at", "vehicle_length",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class TripBlock:
    """``[m1_purse.trip]``: where the card keeps its last trip for the fare (issue 13).

    Read and written only while the fare policy in force looks at the card's last trip
    (entry/exit, transfers, anti-passback); a flat fare leaves the block alone. ``sector`` is
    the public-info sector (default) or a record sector, ``block`` a data block of it that no
    public-info copy or record slot uses; ``layout`` the fields (:data:`M1_TRIP`, overridable
    key by key). The block is written after the purse debit and before the "done" flag
    (agent.products.m1_purse.debit), so a card whose last debit was torn before that flag
    (recovery B/C) shows a trip block that may be the previous trip's."""

    enabled: bool = True
    sector: int | None = None  # None: the public-info sector
    block: int = 2  # §3.1: public-info sector block 2, the last-trip block
    layout: TripLayout = M1_TRIP


@dataclass(frozen=True, slots=True)
class M1Layout:
    """Where and how one city keeps its M1 purse."""

    issuance_sector: int = 1
    issuance_block: int = 0
    issuance_check: IssuanceCheck = "xor"
    directory_check: bool = False
    directory_sector: int = 0
    directory_block: int = 1
    directory_key: bytes = field(default=bytes.fromhex("A0A1A2A3A4A5"), repr=False)
    purse_sector: int = 2
    purse_primary: int = 1
    purse_backup: int = 2
    public_sector: int = 6
    public_primary: int = 0
    public_backup: int = 1
    public_backup_encoding: BackupEncoding = "copy"
    check: CheckKind = "xor"
    check_seed: bytes = b""
    flag_in_progress: int = 0x01
    flag_done: int = 0x02
    flag_done_aliases: tuple[int, ...] = ()  # other values read as "done" (GDMH 0x14)
    blacklist_value: int = 0x04
    record_sectors: tuple[int, ...] = (3, 4, 5)
    record_blocks_per_sector: int = 3
    record_layout: RecordLayout = "cardop"
    record_money_order: ByteOrder = "little"
    record_type: int = 0x06
    enable_flag_normal: int = 0x02
    accepted_card_types: frozenset[int] = frozenset()  # empty: any
    city_codes: frozenset[str] = frozenset()  # BCD hex text; empty: any
    check_access_bits: bool = True
    keys: KeyConfig = field(default_factory=KeyConfig)
    tac: TacConfig = field(default_factory=TacConfig)
    validity: ValidityConfig | None = None  # None: the card's dates are not read
    trip: TripBlock = field(default_factory=TripBlock)

    # --- derived ---------------------------------------------------------------------------

    @property
    def record_slots(self) -> int:
        return len(self.record_sectors) * self.record_blocks_per_sector

    def record_block(self, slot: int) -> tuple[int, int]:
        """(sector, absolute block) of record slot ``slot`` (1-based, §3.1)."""
        if not 1 <= slot <= self.record_slots:
            raise ValueError(f"record slot {slot} outside 1..{self.record_slots}")
        sector = self.record_sectors[(slot - 1) // self.record_blocks_per_sector]
        return sector, block_number(sector, (slot - 1) % self.record_blocks_per_sector)

    def next_pointer(self, pointer: int) -> int:
        """pointer % N + 1 (CARDOP WriteTradeOriginalA); an out-of-range pointer restarts at 1."""
        if not 1 <= pointer <= self.record_slots:
            return 1
        return pointer % self.record_slots + 1

    def is_done(self, flag: int) -> bool:
        return flag == self.flag_done or flag in self.flag_done_aliases

    @property
    def purse_blocks(self) -> tuple[int, int]:
        return (
            block_number(self.purse_sector, self.purse_primary),
            block_number(self.purse_sector, self.purse_backup),
        )

    @property
    def public_blocks(self) -> tuple[int, int]:
        return (
            block_number(self.public_sector, self.public_primary),
            block_number(self.public_sector, self.public_backup),
        )

    def sectors(self) -> dict[str, int]:
        return {
            "issuance": self.issuance_sector,
            "purse": self.purse_sector,
            "public": self.public_sector,
        }

    def role_of_sector(self, sector: int) -> KeyRole:
        if sector == self.purse_sector:
            return "purse"
        if sector == self.public_sector:
            return "public"
        if sector in self.record_sectors:
            return "records"
        raise ValueError(f"sector {sector} has no key role in this layout")

    def sectors_in_use(self) -> tuple[int, ...]:
        """The sectors a tap authenticates with derived keys: purse, public info, records
        (the issuance and directory sectors have keys of their own)."""
        return (self.purse_sector, self.public_sector, *self.record_sectors)

    def key_id(self, sector: int) -> int:
        """The key id (PSAM application id) of ``sector``: its own, else its role's."""
        own = self.keys.sector_ids.get(sector)
        if own is not None:
            return own
        return self.keys.role_ids[self.role_of_sector(sector)]

    def static_key(self, sector: int) -> bytes:
        """The static key of ``sector`` (provider ``static``): its own, else its role's."""
        own = self.keys.static_sectors.get(sector)
        if own is None:
            own = self.keys.static_roles.get(self.role_of_sector(sector))
        if own is None:
            raise ConfigurationError(f"m1_purse.keys: no static key for sector {sector}")
        return own

    @property
    def trip_sector(self) -> int:
        return self.public_sector if self.trip.sector is None else self.trip.sector

    @property
    def trip_block(self) -> int:
        """Absolute block number of the trip block."""
        return block_number(self.trip_sector, self.trip.block)

    @property
    def validity_block(self) -> int | None:
        """Absolute block number of the dates block, or ``None`` when dates are not read."""
        if self.validity is None:
            return None
        return block_number(self.issuance_sector, self.validity.block)

    # --- parsing ---------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: str = "m1_purse") -> M1Layout:
        """Validate a profile's ``[m1_purse]`` table."""
        r = _Fields(raw, source)
        d = cls()
        layout = cls(
            issuance_sector=r.sector("issuance_sector", d.issuance_sector),
            issuance_block=r.index("issuance_block", d.issuance_block),
            issuance_check=cast(
                IssuanceCheck, r.choice("issuance_check", ("xor", "none"), d.issuance_check)
            ),
            directory_check=r.boolean("directory_check", d.directory_check),
            directory_sector=r.sector("directory_sector", d.directory_sector),
            directory_block=r.index("directory_block", d.directory_block),
            directory_key=r.key6("directory_key", d.directory_key),
            purse_sector=r.sector("purse_sector", d.purse_sector),
            purse_primary=r.index("purse_primary", d.purse_primary),
            purse_backup=r.index("purse_backup", d.purse_backup),
            public_sector=r.sector("public_sector", d.public_sector),
            public_primary=r.index("public_primary", d.public_primary),
            public_backup=r.index("public_backup", d.public_backup),
            public_backup_encoding=cast(
                BackupEncoding,
                r.choice("public_backup_encoding", ("copy", "inverted"), d.public_backup_encoding),
            ),
            check=cast(CheckKind, r.choice("check", CHECK_KINDS, d.check)),
            check_seed=r.text_bytes("check_seed", d.check_seed),
            flag_in_progress=r.byte("flag_in_progress", d.flag_in_progress),
            flag_done=r.byte("flag_done", d.flag_done),
            flag_done_aliases=tuple(r.byte_list("flag_done_aliases", d.flag_done_aliases)),
            blacklist_value=r.byte("blacklist_value", d.blacklist_value),
            record_sectors=tuple(r.sector_list("record_sectors", d.record_sectors)),
            record_blocks_per_sector=r.integer(
                "record_blocks_per_sector", d.record_blocks_per_sector, 1, 15
            ),
            record_layout=cast(
                RecordLayout, r.choice("record_layout", ("cardop", "afc"), d.record_layout)
            ),
            record_money_order=cast(
                ByteOrder,
                r.choice("record_money_order", ("little", "big"), d.record_money_order),
            ),
            record_type=r.byte("record_type", d.record_type),
            enable_flag_normal=r.byte("enable_flag_normal", d.enable_flag_normal),
            accepted_card_types=frozenset(
                r.byte_list("accepted_card_types", tuple(d.accepted_card_types))
            ),
            city_codes=frozenset(r.hex_list("city_codes", 2)),
            check_access_bits=r.boolean("check_access_bits", d.check_access_bits),
            keys=_key_config(_Fields(r.table("keys"), f"{source}.keys")),
            tac=_tac_config(_Fields(r.table("tac"), f"{source}.tac")),
            validity=_validity_config(r, source),
            trip=_trip_config(_Fields(r.table("trip"), f"{source}.trip")),
        )
        r.reject_unknown()
        layout._validate(source)
        return layout

    def _validate(self, source: str) -> None:
        def fail(name: str, what: str) -> ConfigurationError:
            return ConfigurationError(f"{source}: field '{name}' {what}")

        for name, sector, index in (
            ("issuance_block", self.issuance_sector, self.issuance_block),
            ("directory_block", self.directory_sector, self.directory_block),
            ("purse_primary", self.purse_sector, self.purse_primary),
            ("purse_backup", self.purse_sector, self.purse_backup),
            ("public_primary", self.public_sector, self.public_primary),
            ("public_backup", self.public_sector, self.public_backup),
        ):
            if index >= blocks_in_sector(sector) - 1:
                raise fail(name, f"must be a data block of sector {sector}, got index {index}")
            if block_number(sector, index) == 0:
                raise fail(name, "must not be the manufacturer block 0")
        if self.purse_primary == self.purse_backup:
            raise fail("purse_backup", "must differ from purse_primary")
        if self.public_sector == self.purse_sector:
            raise fail("public_sector", "must differ from purse_sector (separate keys/access)")
        if self.public_primary == self.public_backup:
            raise fail("public_backup", "must differ from public_primary")
        if self.flag_in_progress == self.flag_done or self.flag_in_progress in (
            self.flag_done_aliases
        ):
            raise fail("flag_in_progress", "must differ from the done flag values")
        if not self.record_sectors:
            raise fail("record_sectors", "must list at least one sector")
        if len(set(self.record_sectors)) != len(self.record_sectors):
            raise fail("record_sectors", "lists a sector twice")
        used = {self.issuance_sector, self.purse_sector, self.public_sector}
        if used & set(self.record_sectors):
            raise fail("record_sectors", "overlaps the issuance, purse or public sector")
        for sector in self.record_sectors:
            if self.record_blocks_per_sector > blocks_in_sector(sector) - 1:
                raise fail("record_blocks_per_sector", f"does not fit sector {sector}")
        if self.record_slots > 0xFF:
            raise fail("record_sectors", "more than 255 record slots")
        if self.issuance_sector in (self.purse_sector, self.public_sector):
            raise fail("issuance_sector", "must differ from the purse and public sectors")
        self._validate_keys(source)
        self._validate_validity(source)
        self._validate_trip(source)

    def _validate_trip(self, source: str) -> None:
        name = f"{source}.trip"
        sector = self.trip_sector
        if sector != self.public_sector and sector not in self.record_sectors:
            raise ConfigurationError(
                f"{name}: field 'sector' must be the public-info sector {self.public_sector} "
                f"or a record sector, got {sector}"
            )
        if self.trip.block >= blocks_in_sector(sector) - 1:
            raise ConfigurationError(
                f"{name}: field 'block' must be a data block of sector {sector}, "
                f"got index {self.trip.block}"
            )
        taken = {*self.public_blocks} | {
            self.record_block(slot)[1] for slot in range(1, self.record_slots + 1)
        }
        if self.trip_block in taken:
            raise ConfigurationError(
                f"{name}: field 'block' {self.trip.block} of sector {sector} is a public-info "
                "copy or a record slot"
            )

    def _validate_keys(self, source: str) -> None:
        keys = self.keys
        needed = self.sectors_in_use()
        for table, entries in (("sector_ids", keys.sector_ids), ("static", keys.static_sectors)):
            for sector in entries:
                if sector not in needed:
                    raise ConfigurationError(
                        f"{source}.keys: field '{table}.{sector}': sector {sector} is not a "
                        f"purse, public-info or record sector of this layout "
                        f"({', '.join(str(s) for s in needed)})"
                    )
        if keys.provider == "static":
            for sector in needed:
                if (
                    sector not in keys.static_sectors
                    and self.role_of_sector(sector) not in keys.static_roles
                ):
                    raise ConfigurationError(
                        f"{source}.keys: provider 'static' needs 'static.{sector}' or "
                        f"'static.{self.role_of_sector(sector)}' (a key for sector {sector})"
                    )
        if keys.provider == "psam_fc" and keys.sector_input == "id_and_sector":
            raise ConfigurationError(
                f"{source}.keys: field 'sector_input': 80 FC takes one byte per sector key "
                "(use 'id' or 'sector'), got 'id_and_sector'"
            )

    def _validate_validity(self, source: str) -> None:
        validity = self.validity
        if validity is None:
            return
        name = f"{source}.validity"
        if validity.block >= blocks_in_sector(self.issuance_sector) - 1:
            raise ConfigurationError(
                f"{name}: field 'block' must be a data block of sector {self.issuance_sector}, "
                f"got index {validity.block}"
            )
        if validity.block == self.issuance_block:
            raise ConfigurationError(
                f"{name}: field 'block' must differ from issuance_block (its 16 bytes are the "
                "card's identity)"
            )
        if block_number(self.issuance_sector, validity.block) == 0:
            raise ConfigurationError(f"{name}: field 'block' must not be the manufacturer block")
        if not validity.dates.offsets():
            raise ConfigurationError(
                f"{name}: needs at least one of 'issue_date', 'start_date', 'expiry_date'"
            )
        problem = validity.dates.problem()
        if problem is not None:
            raise ConfigurationError(f"{name}: {problem}")


def _sector_key(r: _Fields, table: str, name: str) -> int | None:
    """A per-sector entry ("4") of a role-or-sector table, or ``None`` for a role name."""
    if name in KEY_ROLES:
        return None
    if name.isdigit() and int(name) < SECTORS_4K and name == str(int(name)):
        return int(name)
    raise ConfigurationError(
        f"{r.source}: field '{table}.{name}' is not a key role ({', '.join(KEY_ROLES)}) "
        f"or a sector number 0..{SECTORS_4K - 1}"
    )


def _key_config(r: _Fields) -> KeyConfig:
    d = KeyConfig()
    provider = cast(KeyProviderKind, r.choice("provider", KEY_PROVIDERS, d.provider))
    key_type_text = r.choice("key_type", ("A", "B"), d.key_type.name)
    role_ids: dict[KeyRole, int] = dict(d.role_ids)
    sector_ids: dict[int, int] = {}
    for name, value in r.table("sector_ids").items():
        key = str(name)
        sector = _sector_key(r, "sector_ids", key)
        number = r.int_value(f"sector_ids.{key}", value, 0, 0xFF)
        if sector is None:
            role_ids[cast(KeyRole, key)] = number
        else:
            sector_ids[sector] = number
    issuance_key = r.string("issuance_key", d.issuance_key)
    if issuance_key != "uid":
        r.key6_value("issuance_key", issuance_key)
    static_roles: dict[KeyRole, bytes] = {}
    static_sectors: dict[int, bytes] = {}
    for name, text in r.table("static").items():
        key = str(name)
        sector = _sector_key(r, "static", key)
        value = r.key6_value(f"static.{key}", text)
        if sector is None:
            static_roles[cast(KeyRole, key)] = value
        else:
            static_sectors[sector] = value
    master_text = r.string("software_master", "")
    master = b""
    if master_text:
        try:
            master = bytes.fromhex(master_text)
        except ValueError:
            raise ConfigurationError(
                f"{r.source}: field 'software_master' is not valid hex"
            ) from None
        if len(master) != 16:
            raise ConfigurationError(
                f"{r.source}: field 'software_master' must be 16 bytes, got {len(master)}"
            )
    config = KeyConfig(
        provider=provider,
        key_type=KeyType[key_type_text],
        role_ids=role_ids,
        sector_ids=sector_ids,
        sector_input=cast(SectorInput, r.choice("sector_input", SECTOR_INPUTS, d.sector_input)),
        issuance_key=issuance_key.upper() if issuance_key != "uid" else "uid",
        fc_p1=r.byte("fc_p1", d.fc_p1),
        fc_p2=r.byte("fc_p2", d.fc_p2),
        fc_batch=r.boolean("fc_batch", d.fc_batch),
        fc_suffix=cast(
            Literal["none", "city_ff"], r.choice("fc_suffix", ("none", "city_ff"), d.fc_suffix)
        ),
        des_p1=r.byte("des_p1", d.des_p1),
        des_p2=r.byte("des_p2", d.des_p2),
        software_master=master,
        static_roles=static_roles,
        static_sectors=static_sectors,
    )
    r.reject_unknown()
    if provider == "software_3des" and not master:
        raise ConfigurationError(f"{r.source}: provider 'software_3des' needs 'software_master'")
    return config


def _validity_config(parent: _Fields, source: str) -> ValidityConfig | None:
    """``[m1_purse.validity]``; absent: the card's dates are not read."""
    if parent.get("validity", None) is None:
        return None
    r = _Fields(parent.table("validity"), f"{source}.validity")
    d = ValidityConfig()
    offsets: dict[str, int | None] = {}
    for name in ("issue_date", "start_date", "expiry_date"):
        value = r.get(name, None)
        offsets[name] = None if value is None else r.int_value(name, value, 0, 15)
    dates = DatesFormat(
        encoding=cast(DateEncoding, r.choice("date_encoding", DATE_ENCODINGS, d.dates.encoding)),
        check=cast(IssuanceCheck, r.choice("check", ("xor", "none"), d.dates.check)),
        issue=offsets["issue_date"],
        start=offsets["start_date"],
        expiry=offsets["expiry_date"],
    )
    config = ValidityConfig(
        block=r.index("block", d.block),
        dates=dates,
        unset=cast(UnsetDates, r.choice("unset_dates", ("refuse", "unlimited"), d.unset)),
    )
    r.reject_unknown()
    return config


def _trip_config(r: _Fields) -> TripBlock:
    """``[m1_purse.trip]``: ``enabled``, ``sector``, ``block`` and any of the trip layout's
    fields (:data:`TRIP_OVERRIDES`), over :data:`M1_TRIP`; checked whole (inside the 16
    bytes, no two fields on one byte, the amount and time present)."""
    d = TripBlock()
    sector_value = r.get("sector", None)
    changes: dict[str, Any] = {}
    for key in sorted(TRIP_OVERRIDES):
        value = r.get(key, None)
        if value is None:
            continue
        if key in ("line_encoding", "time_encoding"):
            kind: type[FieldEncoding] | type[TimeEncoding] = (
                FieldEncoding if key == "line_encoding" else TimeEncoding
            )
            options = [str(m.value) for m in kind]
            changes[key] = kind(r.choice(key, options, str(getattr(M1_TRIP, key).value)))
        else:
            changes[key] = r.int_value(key, value, -1, 0xFF)
    layout = replace(M1_TRIP, **changes)
    check_trip_layout(
        layout,
        lambda key, what, value: ConfigurationError(
            f"{r.source}: field '{key}' {what}, got {value!r}"
        ),
        card_file=False,
    )
    config = TripBlock(
        enabled=r.boolean("enabled", d.enabled),
        sector=None if sector_value is None else r.sector("sector", 0),
        block=r.index("block", d.block),
        layout=layout,
    )
    r.reject_unknown()
    return config


def _tac_config(r: _Fields) -> TacConfig:
    d = TacConfig()
    fields = tuple(r.string_list("fields", d.fields))
    for i, name in enumerate(fields):
        if name not in TAC_FIELDS:
            raise ConfigurationError(
                f"{r.source}: field 'fields[{i}]' must be one of {', '.join(TAC_FIELDS)}, "
                f"got {name!r}"
            )
    if not fields:
        raise ConfigurationError(f"{r.source}: field 'fields' must not be empty")
    factors = tuple(r.string_list("factors", d.factors))
    for i, name in enumerate(factors):
        if name not in TAC_FACTORS:
            raise ConfigurationError(
                f"{r.source}: field 'factors[{i}]' must be one of {', '.join(TAC_FACTORS)}, "
                f"got {name!r}"
            )
    config = TacConfig(
        enabled=r.boolean("enabled", d.enabled),
        p1=r.byte("p1", d.p1),
        p2=r.byte("p2", d.p2),
        factors=factors,
        fields=fields,
        prefix_iv=r.boolean("prefix_iv", d.prefix_iv),
    )
    r.reject_unknown()
    return config


class _Fields:
    """Typed access to one table; every error names the field."""

    def __init__(self, raw: Any, source: str) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigurationError(f"{source}: must be a table, got {type(raw).__name__}")
        self.raw = raw
        self.source = source
        self.seen: set[str] = set()

    def fail(self, name: str, what: str, value: Any) -> ConfigurationError:
        return ConfigurationError(f"{self.source}: field '{name}' {what}, got {value!r}")

    def get(self, name: str, default: Any) -> Any:
        self.seen.add(name)
        return self.raw.get(name, default)

    def reject_unknown(self) -> None:
        unknown = sorted(str(k) for k in self.raw if k not in self.seen)
        if unknown:
            raise ConfigurationError(f"{self.source}: unknown field '{unknown[0]}'")

    def int_value(self, name: str, value: Any, low: int, high: int) -> int:
        """An integer in ``low..high``. Floats are refused, NaN and infinities (TOML ``nan``,
        ``inf``) with a message of their own, since NaN compares false with every bound."""
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(name, f"must be a finite integer in {low}..{high}", value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, "must be an integer", value)
        if not low <= value <= high:
            raise self.fail(name, f"must be in {low}..{high}", value)
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        return self.int_value(name, self.get(name, default), low, high)

    def byte(self, name: str, default: int) -> int:
        return self.integer(name, default, 0, 0xFF)

    def sector(self, name: str, default: int) -> int:
        return self.integer(name, default, 0, SECTORS_4K - 1)

    def index(self, name: str, default: int) -> int:
        return self.integer(name, default, 0, 14)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, "must be true or false", value)
        return value

    def string(self, name: str, default: str) -> str:
        value = self.get(name, default)
        if not isinstance(value, str):
            raise self.fail(name, "must be a string", value)
        return value

    def choice(self, name: str, options: Sequence[str], default: str) -> str:
        value = self.string(name, default)
        if value not in options:
            raise self.fail(name, f"must be one of {', '.join(options)}", value)
        return value

    def text_bytes(self, name: str, default: bytes) -> bytes:
        value = self.string(name, default.decode("ascii"))
        try:
            return value.encode("ascii")
        except UnicodeEncodeError:
            raise self.fail(name, "must be ASCII text", value) from None

    def key6_value(self, name: str, value: Any) -> bytes:
        if not isinstance(value, str):
            raise ConfigurationError(f"{self.source}: field '{name}' must be a hex string")
        try:
            key = bytes.fromhex(value)
        except ValueError:
            # Never echo (almost) key material.
            raise ConfigurationError(f"{self.source}: field '{name}' is not valid hex") from None
        if len(key) != 6:
            raise ConfigurationError(
                f"{self.source}: field '{name}' must be 6 bytes, got {len(key)}"
            )
        return key

    def key6(self, name: str, default: bytes) -> bytes:
        value = self.get(name, None)
        return default if value is None else self.key6_value(name, value)

    def _list(self, name: str, default: Sequence[Any]) -> list[Any]:
        value = self.get(name, list(default))
        if not isinstance(value, list):
            raise self.fail(name, "must be a list", value)
        return value

    def byte_list(self, name: str, default: Sequence[int]) -> list[int]:
        return [
            self.int_value(f"{name}[{i}]", v, 0, 0xFF)
            for i, v in enumerate(self._list(name, default))
        ]

    def sector_list(self, name: str, default: Sequence[int]) -> list[int]:
        return [
            self.int_value(f"{name}[{i}]", v, 0, SECTORS_4K - 1)
            for i, v in enumerate(self._list(name, default))
        ]

    def string_list(self, name: str, default: Sequence[str]) -> list[str]:
        values = self._list(name, default)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise self.fail(f"{name}[{i}]", "must be a string", v)
        return values

    def hex_list(self, name: str, length: int) -> list[str]:
        out = []
        for i, v in enumerate(self._list(name, [])):
            ok = isinstance(v, str) and len(v) == 2 * length
            if ok:
                try:
                    bytes.fromhex(v)
                except ValueError:
                    ok = False
            if not ok:
                raise self.fail(f"{name}[{i}]", f"must be {2 * length} hex digits", v)
            out.append(v.upper())
        return out

    def table(self, name: str) -> Mapping[str, Any]:
        value = self.get(name, {})
        if not isinstance(value, Mapping):
            raise self.fail(name, "must be a table", value)
        return value
