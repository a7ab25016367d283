"""TFRecord framing without TensorFlow: read and write records, checking both masked CRC32C checksums.

A TFRecord file is records back to back, with no header or footer. Each record is

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)

The checksum is CRC-32C (Castagnoli), masked as ((crc >> 15 | crc << 17) + 0xA282EAD8) mod 2**32 so that a CRC
stored inside checksummed data does not checksum to a fixed value.

The CRC itself comes from `google-crc32c` (Google's maintained binding of the hardware-accelerated C library, with a
pure-Python fallback): a Python table-driven CRC runs at a few MB/s, far too slow for the 124 GB Bridge set, and
the PyPI TFRecord readers either skip the CRC (`tfrecord`) or need it anyway (`tfrecord-slow`).

Reading is streaming: one record is held in memory at a time, so a shard of any size reads in constant memory.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import google_crc32c

from ..errors import VlaBenchError

_HEADER = struct.Struct("<QI")  # length, masked crc of the 8 length bytes
_FOOTER = struct.Struct("<I")  # masked crc of the data
_LENGTH = struct.Struct("<Q")
_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def iter_records(path: str | os.PathLike, *, check_crc: bool = True) -> Iterator[bytes]:
    """Yield the data of every record of the TFRecord file at `path`, in order.

    Raises VlaBenchError naming the file and the byte offset of the bad record when a record is truncated or, with
    `check_crc`, when a checksum does not match (a corrupt download)."""
    for _offset, data in iter_records_with_offsets(path, check_crc=check_crc):
        yield data


def iter_records_with_offsets(path: str | os.PathLike, *, check_crc: bool = True) -> Iterator[tuple[int, bytes]]:
    """Like `iter_records`, but yield (byte offset of the record's header, record data)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise VlaBenchError(f"cannot open TFRecord shard {path}: {e.strerror}") from e
    with f:
        offset = 0
        while True:
            data = _read_record(f, path, offset, check_crc)
            if data is None:
                return
            yield offset, data
            offset += _HEADER.size + len(data) + _FOOTER.size


def _read_record(f: BinaryIO, path: Path, offset: int, check_crc: bool) -> bytes | None:
    header = f.read(_HEADER.size)
    if not header:
        return None  # clean end of file: the previous record ended exactly here
    if len(header) < _HEADER.size:
        raise _corrupt(path, offset, f"truncated record header ({len(header)} of {_HEADER.size} bytes)")
    length, length_crc = _HEADER.unpack(header)
    if check_crc and masked_crc32c(header[:8]) != length_crc:
        raise _corrupt(path, offset, "length checksum mismatch")
    left = os.fstat(f.fileno()).st_size - f.tell()
    if length > left:  # never ask read() for more than the file holds (a damaged length can claim exabytes)
        raise _corrupt(path, offset, f"truncated record data ({left} of {length} bytes)")
    data = f.read(length)
    if len(data) < length:
        raise _corrupt(path, offset, f"truncated record data ({len(data)} of {length} bytes)")
    footer = f.read(_FOOTER.size)
    if len(footer) < _FOOTER.size:
        raise _corrupt(path, offset, "truncated record: data checksum missing")
    if check_crc and masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
        raise _corrupt(path, offset, f"data checksum mismatch in the {length}-byte record")
    return data


def _corrupt(path: Path, offset: int, what: str) -> VlaBenchError:
    return VlaBenchError(
        f"corrupt TFRecord shard {path} at byte offset {offset}: {what}. "
        "Re-download this shard (the file is damaged or incomplete)."
    )


def encode_record(data: bytes) -> bytes:
    """One framed TFRecord record holding `data`."""
    length = _LENGTH.pack(len(data))
    return length + _FOOTER.pack(masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data))


def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Write `records` to a new TFRecord file at `path`; return the number of bytes written."""
    written = 0
    with open(path, "wb") as f:
        for data in records:
            framed = encode_record(data)
            f.write(framed)
            written += len(framed)
    return written
