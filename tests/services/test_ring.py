"""The output ring against a model: the last `capacity` bytes of everything appended.

The ring's storage becomes circular once full; whatever the wrap position, every
read must equal the same read of the model (the plain bytes of the stream's tail).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aetherd.services.ring import OutputRing, _is_continuation, _utf8_cut


class Model:
    """The ring's contract in the simplest terms: a bytes tail and its start offset."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data = b""
        self.start = 0

    def append(self, data: bytes) -> None:
        self.data += data
        excess = len(self.data) - self.capacity
        if excess > 0:
            self.data = self.data[excess:]
            self.start += excess

    @property
    def end(self) -> int:
        return self.start + len(self.data)

    def chunk(self, offset: int, limit: int, final: bool) -> tuple[int, bytes]:
        start = max(offset, self.start)
        rel = start - self.start
        if start == self.start and offset < self.start:
            skip = 0
            while (
                skip < 3 and rel + skip < len(self.data) and _is_continuation(self.data[rel + skip])
            ):
                skip += 1
            rel += skip
            start += skip
        stop = min(len(self.data), rel + limit)
        if stop > rel and not (final and stop == len(self.data)):
            cut = _utf8_cut(self.data, stop)
            if cut > rel:
                stop = cut
            elif stop == len(self.data):
                stop = rel
        return start, self.data[rel:stop]

    def raw(self, offset: int, limit: int) -> tuple[int, bytes]:
        start = max(offset, self.start)
        rel = start - self.start
        return start, self.data[rel : min(len(self.data), rel + limit)]


# Output with multi-byte characters, so cuts land inside characters and at the wrap.
pieces = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.text(max_size=12).map(lambda text: text.encode()),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=400, deadline=None)
@given(
    capacity=st.integers(4, 64),
    start=st.integers(0, 2**40),
    appends=pieces,
    reads=st.lists(st.tuples(st.integers(-70, 70), st.integers(1, 80), st.booleans()), max_size=8),
)
def test_ring_reads_equal_the_models(
    capacity: int, start: int, appends: list[bytes], reads: list[tuple[int, int, bool]]
) -> None:
    ring, model = OutputRing(capacity), Model(capacity)
    ring.start = model.start = start  # an adopted ring starts anywhere
    for data in appends:
        ring.append(data)
        model.append(data)
        assert (ring.start, ring.end, len(ring)) == (model.start, model.end, len(model.data))
        assert ring.contents() == model.data
        for back, limit, final in reads:
            offset = max(0, model.end - back) if back >= 0 else model.start + back
            offset = max(0, offset)
            assert ring.chunk(offset, limit, final) == model.chunk(offset, limit, final)
            assert ring.raw(offset, limit) == model.raw(offset, limit)
        skip = 0
        while skip < 3 and skip < len(model.data) and _is_continuation(model.data[skip]):
            skip += 1
        assert ring.text_start() == model.start + skip


def test_a_full_ring_wraps_in_place_and_reads_across_the_wrap() -> None:
    ring = OutputRing(8)
    ring.append(b"abcdef")
    ring.append(b"ghij")  # fills, then wraps: the storage holds "ij" at its head
    assert (ring.start, ring.end) == (2, 10)
    assert ring.contents() == b"cdefghij"
    assert ring.chunk(5, 4, final=False) == (5, b"fghi")
    assert ring.raw(8, 10) == (8, b"ij")
    storage = ring._store
    ring.append(b"klmnopqrstu")  # more than the capacity at once: only its tail stays
    assert ring._store is storage and len(storage) == 8  # never reallocated once full
    assert ring.contents() == b"nopqrstu"
    assert (ring.start, ring.end) == (13, 21)


def test_a_character_split_by_the_wrap_comes_out_whole() -> None:
    ring = OutputRing(8)
    ring.append(b"abcdef")
    ring.append(b"g" + "€".encode())  # the euro sign's 3 bytes straddle the wrap
    assert ring.chunk(ring.end - 3, 100, final=False) == (ring.end - 3, "€".encode())
    assert ring.chunk(ring.end - 4, 2, final=False) == (ring.end - 4, b"g")


def test_an_idle_ring_holds_only_what_was_written() -> None:
    ring = OutputRing(1 << 20)
    ring.append(b"$ ")
    assert len(ring._store) == 2  # grown with the output, not allocated to capacity
