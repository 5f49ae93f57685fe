"""Tests for ecdc.bitpack: exact LSB-first packing compatible with Meta's v0 BitPacker."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecdc import bitpack
from ecdc.bitpack import pack_codes, packed_size, unpack_codes
from ecdc.errors import TruncatedError


def reference_pack(values: list[int], bits: int) -> bytes:
    """Bit-at-a-time packer written straight from the spec (LSB-first, zero padded)."""
    out = bytearray()
    acc = 0
    nacc = 0
    for v in values:
        for k in range(bits):
            acc |= ((v >> k) & 1) << nacc
            nacc += 1
            if nacc == 8:
                out.append(acc)
                acc = 0
                nacc = 0
    if nacc:
        out.append(acc)
    return bytes(out)


def reference_unpack(data: bytes, bits: int, count: int) -> list[int]:
    """Bit-at-a-time reader: bit k of the stream is bit k%8 of byte k//8."""
    return [
        sum(((data[(i * bits + k) // 8] >> ((i * bits + k) % 8)) & 1) << k for k in range(bits))
        for i in range(count)
    ]


@st.composite
def width_and_values(draw: st.DrawFn, max_count: int = 300) -> tuple[int, list[int]]:
    bits = draw(st.integers(1, 16))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=max_count))
    return bits, values


@settings(max_examples=300, deadline=None)
@given(width_and_values())
def test_round_trip_matches_reference(case: tuple[int, list[int]]) -> None:
    bits, values = case
    arr = np.array(values, dtype=np.int64)
    data = pack_codes(arr, bits)
    assert len(data) == (len(values) * bits + 7) // 8 == packed_size(len(values), bits)
    assert data == reference_pack(values, bits)
    back = unpack_codes(data, bits, len(values))
    assert back.dtype == np.int64
    assert back.tolist() == values
    assert reference_unpack(data, bits, len(values)) == values


@pytest.mark.parametrize("bits", range(1, 17))
def test_every_width_extremes(bits: int) -> None:
    top = (1 << bits) - 1
    values = [0, top, 1 % (top + 1), top, 0, 0, top] * 5
    data = pack_codes(np.array(values, dtype=np.uint32), bits)
    assert data == reference_pack(values, bits)
    assert unpack_codes(data, bits, len(values)).tolist() == values
    assert pack_codes(np.array([], dtype=np.int64), bits) == b""
    assert unpack_codes(b"", bits, 0).shape == (0,)


def test_worked_example_from_format_doc() -> None:
    # docs/FORMAT.md: the 10-bit codes 1, 2, 1023 pack to 01 08 f0 3f.
    assert pack_codes(np.array([1, 2, 1023]), 10) == bytes.fromhex("0108f03f")
    assert unpack_codes(bytes.fromhex("0108f03f"), 10, 3).tolist() == [1, 2, 1023]


def test_any_shape_is_flattened_in_c_order() -> None:
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    assert pack_codes(arr, 5) == pack_codes(arr.reshape(-1), 5)
    assert pack_codes(arr.T, 5) == pack_codes(np.ascontiguousarray(arr.T).reshape(-1), 5)


def test_many_codes_across_block_boundaries() -> None:
    rng = np.random.default_rng(0)
    n = bitpack._BLOCK * 2 + 13
    for bits in (3, 10, 16):
        values = rng.integers(0, 1 << bits, size=n)
        data = pack_codes(values, bits)
        assert len(data) == packed_size(n, bits)
        np.testing.assert_array_equal(unpack_codes(data, bits, n), values)
    # Spot-check one width against the reference across the first boundary.
    values = rng.integers(0, 1 << 10, size=bitpack._BLOCK + 9)
    data = pack_codes(values, 10)
    start = (bitpack._BLOCK - 16) * 10 // 8
    tail = values[bitpack._BLOCK - 16:].tolist()
    assert data[start:] == reference_pack(tail, 10)


@given(st.integers(1, 16), st.lists(st.integers(0, 2**20), min_size=1, max_size=30))
def test_out_of_range_values_raise(bits: int, values: list[int]) -> None:
    arr = np.array(values + [1 << bits], dtype=np.int64)
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(arr, bits)
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(np.array(values + [-1], dtype=np.int64), bits)


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, "10", True, None])
def test_bad_bits_raise(bits: object) -> None:
    with pytest.raises(ValueError):
        pack_codes(np.zeros(3, dtype=np.int64), bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        unpack_codes(b"\0\0\0\0", bits, 1)  # type: ignore[arg-type]


def test_non_integer_arrays_raise() -> None:
    with pytest.raises(ValueError, match="integer"):
        pack_codes(np.array([1.0, 2.0]), 10)
    with pytest.raises(ValueError, match="integer"):
        pack_codes(np.array([True, False]), 1)


@given(width_and_values(max_count=100).filter(lambda c: len(c[1]) > 0))
def test_short_data_raises_truncated(case: tuple[int, list[int]]) -> None:
    bits, values = case
    data = pack_codes(np.array(values, dtype=np.int64), bits)
    with pytest.raises(TruncatedError):
        unpack_codes(data[:-1], bits, len(values))
    # Extra trailing bytes are ignored.
    assert unpack_codes(data + b"\xff", bits, len(values)).tolist() == values


def test_negative_count_raises() -> None:
    with pytest.raises(ValueError):
        unpack_codes(b"\0", 8, -1)
