"""tf.train.Example parsing and serialization, written against the protobuf wire format directly.

Why our own ~150 lines rather than a package: the Example schema is five wire cases (map entries, and bytes, float
and int64 lists, packed or not), the PyPI readers either drag in `protobuf` and register `tensorflow.Example` in the
process-wide descriptor pool (the `tfrecord` package; a clash with TensorFlow or TensorBoard protos in the same
process) or parse nothing at all (`tfrecord-slow`), and decoding packed floats straight into numpy is faster than
protobuf's Python objects. Schema (package `tensorflow`, proto3):

    Example    { Features features = 1; }
    Features   { map<string, Feature> feature = 1; }        # on the wire: repeated {string key = 1; Feature value = 2;}
    Feature    { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList  { repeated bytes value = 1; }
    FloatList  { repeated float value = 1 [packed = true]; }
    Int64List  { repeated int64 value = 1 [packed = true]; }

A parsed Example is a dict: key -> list[bytes] (bytes_list), float32 array (float_list) or int64 array (int64_list).
"""
from __future__ import annotations

from typing import Collection, Mapping, Sequence, Union

import numpy as np

from ..errors import VlaBenchError

FeatureValue = Union[list, np.ndarray]

# wire types
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
# Feature's oneof field numbers
_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = 1, 2, 3


class ExampleParseError(ValueError):
    """The bytes are not a well-formed tf.train.Example (the caller adds which file and record)."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ExampleParseError("varint runs past the end of the message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ExampleParseError("varint longer than 10 bytes")


def _fields(buf: memoryview):
    """Yield (field number, wire type, value) of a message; LEN values are memoryviews, others ints."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ExampleParseError(f"field {number} claims {size} bytes, only {end - pos} left")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == _FIXED32:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == _FIXED64:
            value, pos = buf[pos : pos + 8], pos + 8
        else:
            raise ExampleParseError(f"unsupported wire type {wire} for field {number}")
        if pos > end:
            raise ExampleParseError(f"field {number} runs past the end of the message")
        yield number, wire, value


def _signed64(v: int) -> int:
    if v >= 1 << 64:  # a 10-byte varint can carry 70 bits; int64 holds 64
        raise ExampleParseError(f"varint {v} does not fit in 64 bits")
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_feature(buf: memoryview) -> FeatureValue:
    value: FeatureValue = []  # a Feature with no kind set: an empty list
    for number, wire, payload in _fields(buf):
        if wire != _LEN:
            raise ExampleParseError(f"Feature field {number} has wire type {wire}, expected a list message")
        if number == _BYTES_LIST:
            value = [bytes(v) for n, w, v in _fields(payload) if n == 1 and w == _LEN]
        elif number == _FLOAT_LIST:
            value = _parse_floats(payload)
        elif number == _INT64_LIST:
            value = _parse_ints(payload)
    return value


def _parse_floats(buf: memoryview) -> np.ndarray:
    chunks = []
    for number, wire, payload in _fields(buf):
        if number != 1:
            continue
        if wire == _LEN:  # packed: the usual encoding
            if len(payload) % 4:
                raise ExampleParseError(f"packed float list of {len(payload)} bytes is not a multiple of 4")
            chunks.append(np.frombuffer(payload, dtype="<f4"))
        elif wire == _FIXED32:  # one unpacked float (proto3 parsers must accept both)
            chunks.append(np.frombuffer(payload, dtype="<f4"))
    if not chunks:
        return np.zeros(0, np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False) if len(chunks) > 1 else chunks[0].astype(np.float32)


def _parse_ints(buf: memoryview) -> np.ndarray:
    values = []
    for number, wire, payload in _fields(buf):
        if number != 1:
            continue
        if wire == _LEN:  # packed varints
            pos = 0
            while pos < len(payload):
                v, pos = _varint(payload, pos)
                values.append(_signed64(v))
        elif wire == _VARINT:
            values.append(_signed64(payload))
    return np.array(values, dtype=np.int64)


def parse_example(data: bytes | memoryview, keys: Collection[str] | None = None) -> dict[str, FeatureValue]:
    """Parse a serialized tf.train.Example into {key: list[bytes] | float32 array | int64 array}.

    With `keys`, only those features are decoded (the others are skipped unparsed, which is what makes reading
    one camera out of four cheap). Raises ExampleParseError on malformed bytes."""
    out: dict[str, FeatureValue] = {}
    for number, wire, features in _fields(memoryview(data)):
        if number != 1 or wire != _LEN:
            continue
        for entry_number, entry_wire, entry in _fields(features):
            if entry_number != 1 or entry_wire != _LEN:
                continue
            key, value_buf = None, None
            for n, w, v in _fields(entry):
                if n == 1 and w == _LEN:
                    try:
                        key = bytes(v).decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ExampleParseError(f"feature key is not UTF-8 ({e.reason})") from None
                elif n == 2 and w == _LEN:
                    value_buf = v
            if key is None or (keys is not None and key not in keys):
                continue
            out[key] = _parse_feature(value_buf) if value_buf is not None else []
    return out


# ---------------------------------------------------------------------------------------------------- serializing


def _encode_varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negatives as 10-byte two's complement, like protobuf
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint((number << 3) | _LEN) + _encode_varint(len(payload)) + payload


def _encode_feature(key: str, value: FeatureValue | Sequence) -> bytes:
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        flat = value.reshape(-1)
        if flat.dtype.kind == "f":
            packed = flat.astype("<f4").tobytes()
            kind = _FLOAT_LIST
        else:
            packed = b"".join(_encode_varint(int(v)) for v in flat.astype(np.int64))
            kind = _INT64_LIST
        inner = _len_field(1, packed) if flat.size else b""
    else:
        items = list(value)
        if not all(isinstance(v, (bytes, bytearray, str)) for v in items):
            raise VlaBenchError(
                f"feature {key!r}: cannot serialize {type(value).__name__}; "
                "give a numeric numpy array, or a list of bytes/str"
            )
        inner = b"".join(_len_field(1, v.encode("utf-8") if isinstance(v, str) else bytes(v)) for v in items)
        kind = _BYTES_LIST
    return _len_field(kind, inner)


def serialize_example(features: Mapping[str, FeatureValue | Sequence]) -> bytes:
    """Serialize {key: numeric array | list of bytes/str} as a tf.train.Example.

    Float arrays become float_list (float32), integer and bool arrays int64_list, lists of bytes or str
    bytes_list (str as UTF-8). Arrays are flattened row-major, as TFDS does."""
    entries = b"".join(
        _len_field(1, _len_field(1, key.encode("utf-8")) + _len_field(2, _encode_feature(key, value)))
        for key, value in features.items()
    )
    return _len_field(1, entries)
