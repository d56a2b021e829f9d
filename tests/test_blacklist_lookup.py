"""Blacklist lookups (issue 14, city scale) agree with a Python set: property tests over random
lists and random deltas, with ASNs crowded the way real issuers crowd them (one issuer's serials
share their top 16 bits, so one bucket holds more than the 256 entries one find searches) and
values whose bytes contain another entry's key off an entry boundary."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import blacklist as bl
from agent.blacklist import Blacklist
from tests.test_blacklist import NOW, Signer, card

ISSUERS = (0x5170_0701_0000_0000, 0x0310_0000_0000_0000, 0xFFFF_0000_0000_0000, 0)

# a crowded issuer range (consecutive serials), anywhere in u64, and the bucket edges
crowded = st.builds(lambda base, n: base + n, st.sampled_from(ISSUERS), st.integers(0, 3000))
anywhere = st.integers(0, bl.ASN_MAX)
edges = st.sampled_from([0, bl.ASN_MAX, 1 << 48, (1 << 48) - 1, 0xFFFF_FFFF_FFFF])
asns = st.one_of(crowded, crowded, anywhere, edges)
# dense runs of one issuer's serials (every 1st, 2nd or 3rd): buckets searched through the fences
runs = st.lists(
    st.tuples(
        st.sampled_from(ISSUERS), st.integers(0, 5000), st.integers(1, 600), st.integers(1, 3)
    ),
    max_size=3,
).map(lambda found: {b + start + step * i for b, start, n, step in found for i in range(n)})
lists = st.builds(set.union, st.sets(asns, max_size=1000), runs)


def probes_around(values: set[int], extra: list[int]) -> set[int]:
    """Every listed value, its neighbours and its byte-shifted variants, plus ``extra``."""
    out = set(extra)
    for v in values:
        for p in (v - 1, v, v + 1, v ^ (1 << 48), (v << 8) & bl.ASN_MAX, v >> 8):
            if 0 <= p <= bl.ASN_MAX:
                out.add(p)
    return out


def check(listed: Blacklist, expected: set[int], extra: list[int]) -> None:
    assert len(listed) == len(expected)
    for probe in probes_around(expected, extra):
        assert listed.contains_asn(probe) == (probe in expected), hex(probe)
    for v in list(expected)[:50]:
        assert listed.contains(card(v))


@settings(max_examples=60)
@given(values=lists, extra=st.lists(asns, max_size=50))
def test_lookups_of_a_random_snapshot_agree_with_a_set(values: set[int], extra: list[int]) -> None:
    signer = Signer()
    with tempfile.TemporaryDirectory() as name:
        path = Path(name) / bl.BLACKLIST_FILE
        listed = Blacklist.open(path, auto_refresh_s=None)
        listed.apply(signer.snapshot(1, sorted(values)), signer.public, now=NOW)
        check(listed, values, extra)
        # the agent's view: the file read whole, fences built at load
        check(Blacklist.open(path, auto_refresh_s=None), values, extra)


@settings(max_examples=30)
@given(
    first=lists,
    deltas=st.lists(
        st.tuples(st.sets(asns, max_size=300), st.sets(asns, max_size=300), st.integers(0, 200)),
        min_size=1,
        max_size=5,
    ),
    extra=st.lists(asns, max_size=30),
)
def test_lookups_after_random_deltas_agree_with_a_set(
    first: set[int],
    deltas: list[tuple[set[int], set[int], int]],
    extra: list[int],
) -> None:
    signer = Signer()
    with tempfile.TemporaryDirectory() as name:
        path = Path(name) / bl.BLACKLIST_FILE
        # the daemon applies (header and offsets only), the agent reads the file it renames in
        daemon = Blacklist.open(path, auto_refresh_s=None, lookups=False)
        agent = Blacklist.open(path, auto_refresh_s=0.0)
        daemon.apply(signer.snapshot(1, sorted(first)), signer.public, now=NOW)
        expected = set(first)
        for version, (add, unlisted, drop) in enumerate(deltas, start=2):
            remove = unlisted | set(sorted(expected)[:drop])  # removals of listed values too
            document = signer.delta(version - 1, version, sorted(add), sorted(remove))
            daemon.apply(document, signer.public, now=NOW)
            expected = (expected - remove) | add  # removals apply before additions
            agent.refresh()
            check(agent, expected, extra + sorted(remove)[:50])
        assert daemon.memory_bytes() < 300_000  # the daemon never built fences


def bucket_probes(
    listed: Blacklist, bucket: int, values: list[int], rng: random.Random
) -> set[int]:
    """Probes of one crowded bucket: every listed value and its neighbours, the bucket's edges
    and the values just outside them, every fence of the bucket and its neighbours, and random
    values in and around the bucket."""
    packed = listed._packed  # the fences the lookup bisects
    lo, hi = packed.offsets[bucket], packed.offsets[bucket + 1]
    first, last = -(-lo // bl._FENCE), -(-hi // bl._FENCE)
    keys = list(packed.fences[max(first - 1, 0) : last + 1])
    low, high = min(values), max(values)
    edges = [bucket << 48, (bucket + 1) << 48, low, high]
    out = {p + d for p in keys + edges + values for d in (-1, 0, 1)}
    out |= {(bucket << 48) + rng.randrange(1 << 48) for _ in range(2000)}
    out |= {rng.randrange(low - 50, high + 50) for _ in range(2000)}
    return {p for p in out if 0 <= p <= bl.ASN_MAX}


@settings(max_examples=12)
@given(
    before=st.integers(0, 7000),
    run=st.integers(0, 12_000),
    sparse=st.integers(0, 8000),
    after=st.integers(0, 7000),
    far=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_lookups_in_a_crowded_bucket_and_beside_it_agree_with_a_set(
    before: int, run: int, sparse: int, after: int, far: bool, seed: int
) -> None:
    """A bucket searched through the fences (a city's serials: a consecutive run and scattered
    ones), between neighbour buckets whose sizes put its ends anywhere in a run of ``_FENCE``
    entries (the neighbours may be crowded too), or at entry 0."""
    rng = random.Random(seed)
    bucket = 0x5170
    base = bucket << 48
    start = rng.randrange(1 << 47)
    crowded = {base + start + i for i in range(run)}
    while len(crowded) < run + sparse + 16 * bl._SCAN:
        crowded.add(base + rng.randrange(1 << 48))
    neighbours = {((bucket - 1) << 48) + (1 << 48) - 1 - i for i in range(before // 2)}
    neighbours |= {((bucket - 1) << 48) + rng.randrange(1 << 48) for _ in range(before // 2)}
    neighbours |= {((bucket + 1) << 48) + i for i in range(after // 2)}
    neighbours |= {((bucket + 1) << 48) + rng.randrange(1 << 48) for _ in range(after // 2)}
    if far:
        neighbours |= {0, bl.ASN_MAX, base - (1 << 60), base + (1 << 60)}
    values = crowded | neighbours
    signer = Signer()
    with tempfile.TemporaryDirectory() as name:
        path = Path(name) / bl.BLACKLIST_FILE
        Blacklist.open(path, auto_refresh_s=None, lookups=False).apply(
            signer.snapshot(1, sorted(values)), signer.public, now=NOW
        )
        listed = Blacklist.open(path, auto_refresh_s=None)
    packed = listed._packed
    lo, hi = packed.offsets[bucket], packed.offsets[bucket + 1]
    assert hi - lo > bl._SCAN  # searched through the fences
    assert len(listed) == len(values)
    probes: set[int] = set()
    for b in (bucket - 1, bucket, bucket + 1, 0, 0xFFFF):
        if in_bucket := [v for v in values if v >> 48 == b]:
            probes |= bucket_probes(listed, b, in_bucket, rng)
    for probe in probes:
        assert listed.contains_asn(probe) == (probe in values), hex(probe)
