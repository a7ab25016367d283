"""TFRecord framing and tf.train.Example parsing, on the real Bridge debug shard and on hand-built bytes."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_bench.data.example_proto import ExampleParseError, parse_example, serialize_example
from vla_bench.data.tfrecord import (encode_record, iter_records, iter_records_with_offsets, masked_crc32c,
                                     write_records)
from vla_bench.errors import VlaBenchError

from tests.conftest import BRIDGE_DEBUG

SHARD = BRIDGE_DEBUG / "1.0.0" / "bridge_dataset-train.tfrecord-00000-of-00001"


def test_crc32c_check_value_and_mask():
    # the CRC-32C check value, and the mask formula computed by hand on it
    assert google_crc32c.value(b"123456789") == 0xE3069283
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_real_shard_has_25_records_that_tile_the_file():
    offsets = [(offset, len(data)) for offset, data in iter_records_with_offsets(SHARD)]
    assert len(offsets) == 25
    position = 0
    for offset, length in offsets:
        assert offset == position
        position += 8 + 4 + length + 4
    assert position == SHARD.stat().st_size


@pytest.fixture
def shard_copy(tmp_path) -> Path:
    copy = tmp_path / SHARD.name
    shutil.copyfile(SHARD, copy)
    copy.chmod(0o644)
    return copy


def _offsets(path: Path) -> list[int]:
    return [offset for offset, _ in iter_records_with_offsets(path)]


def _flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupt_data_byte_names_shard_and_record_offset(shard_copy):
    third = _offsets(shard_copy)[3]
    _flip_byte(shard_copy, third + 12 + 1000)  # inside the 4th record's data
    records = iter_records(shard_copy)
    for _ in range(3):
        next(records)  # the first three records are intact
    with pytest.raises(VlaBenchError) as info:
        next(records)
    message = str(info.value)
    assert str(shard_copy) in message and f"byte offset {third}" in message and "checksum" in message


def test_corrupt_length_names_offset(shard_copy):
    second = _offsets(shard_copy)[1]
    _flip_byte(shard_copy, second + 2)  # in the length field of the 2nd record
    with pytest.raises(VlaBenchError, match=f"byte offset {second}: length checksum"):
        list(iter_records(shard_copy))


def test_corruption_passes_unnoticed_without_crc_check(shard_copy):
    # the checksum is what catches it: the framing alone reads the damaged record fine
    _flip_byte(shard_copy, _offsets(shard_copy)[0] + 12 + 500)
    assert len(list(iter_records(shard_copy, check_crc=False))) == 25


@pytest.mark.parametrize("cut", [5, 12 + 100, -2])  # inside the header, inside the data, inside the footer
def test_truncated_file_names_offset_of_the_cut_record(shard_copy, cut):
    offsets = _offsets(shard_copy)
    last = offsets[-1]
    size = shard_copy.stat().st_size
    keep = last + cut if cut > 0 else size + cut
    shard_copy.write_bytes(shard_copy.read_bytes()[:keep])
    with pytest.raises(VlaBenchError, match=f"{shard_copy.name} at byte offset {last}: truncated"):
        list(iter_records(shard_copy))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(VlaBenchError, match="cannot open TFRecord shard"):
        list(iter_records(tmp_path / "nope.tfrecord"))


@given(st.lists(st.binary(max_size=300), max_size=8))
@settings(max_examples=50, deadline=None)
def test_records_round_trip(tmp_path_factory, records):
    """Any list of byte strings written as TFRecord reads back identical and in order."""
    path = tmp_path_factory.mktemp("rt") / "x.tfrecord"
    written = write_records(path, records)
    assert written == path.stat().st_size == sum(len(r) + 16 for r in records)
    assert list(iter_records(path)) == records


def test_encode_record_layout():
    framed = encode_record(b"abc")
    assert struct.unpack("<Q", framed[:8])[0] == 3
    assert struct.unpack("<I", framed[8:12])[0] == masked_crc32c(framed[:8])
    assert framed[12:15] == b"abc"
    assert struct.unpack("<I", framed[15:])[0] == masked_crc32c(b"abc")


# -------------------------------------------------------------------------------------------- Example protobuf


def test_parse_real_example_and_reserialize_identically():
    data = next(iter_records(SHARD))
    example = parse_example(data)
    assert len(example) == 20
    kinds = {k: ("bytes" if isinstance(v, list) else v.dtype.name) for k, v in example.items()}
    assert sum(k == "bytes" for k in kinds.values()) == 6
    assert sum(k == "float32" for k in kinds.values()) == 5
    assert sum(k == "int64" for k in kinds.values()) == 9
    assert example["steps/action"].shape == (70,)
    assert example["steps/observation/image_0"][0][:4] == b"\xff\xd8\xff\xe0"  # JPEG
    assert serialize_example(example) == data  # byte-identical: same field order, packed encodings


def test_parse_selected_keys_only():
    data = next(iter_records(SHARD))
    example = parse_example(data, keys={"steps/action", "steps/is_first"})
    assert set(example) == {"steps/action", "steps/is_first"}
    assert example["steps/is_first"].tolist() == [1] + [0] * 9


def test_round_trip_values_including_negative_ints_and_empty_lists():
    features = {
        "f": np.array([1.5, -2.25, 3e-8], np.float32),
        "i": np.array([0, -1, 2**40, -(2**63)], np.int64),
        "b": np.array([True, False]),
        "s": ["héllo", b"\x00\xff"],
        "empty_float": np.zeros(0, np.float32),
    }
    parsed = parse_example(serialize_example(features))
    np.testing.assert_array_equal(parsed["f"], features["f"])
    assert parsed["i"].tolist() == [0, -1, 2**40, -(2**63)]
    assert parsed["b"].tolist() == [1, 0]
    assert parsed["s"] == ["héllo".encode(), b"\x00\xff"]
    assert len(parsed["empty_float"]) == 0


def _ld(number: int, payload: bytes) -> bytes:
    return bytes([(number << 3) | 2, len(payload)]) + payload


def test_unpacked_encodings_are_accepted():
    # proto3 parsers must accept non-packed repeated scalars: fixed32 floats (tag 0x0D), varint ints (tag 0x08)
    floats = _ld(2, b"\x0d" + struct.pack("<f", 1.5) + b"\x0d" + struct.pack("<f", -4.0))
    ints = _ld(3, b"\x08\x05\x08\x07")
    entries = _ld(1, _ld(1, b"a") + _ld(2, floats)) + _ld(1, _ld(1, b"b") + _ld(2, ints))
    parsed = parse_example(_ld(1, entries))
    assert parsed["a"].tolist() == [1.5, -4.0]
    assert parsed["b"].tolist() == [5, 7]


@pytest.mark.parametrize("data", [b"\x0a\x05\x0a\x03", b"\x0a\xff", b"\x0f\x00"])
def test_malformed_bytes_raise_parse_error(data):
    with pytest.raises(ExampleParseError):
        parse_example(data)
