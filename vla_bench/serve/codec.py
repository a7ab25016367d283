"""msgpack with numpy arrays, in the two conventions spoken on the wire, decoded strictly.

Arrays travel as maps {"__ndarray__": True, "data": raw bytes, "dtype": "<f4", "shape": [...]}: openpi's
msgpack_numpy writes the keys as bytes, vla-eval's numpy_codec as strings, and each reader looks only for its own
spelling, so `pack` writes the spelling of the protocol it speaks and `unpack` reads both. vla-eval also sends
camera frames as {"__image__": True, "format": "raw" | "png" | "jpeg", ...}; `unpack` decodes those too (Pillow,
with its decompression-bomb limit).

Decoding never unpickles and accepts only plain numeric dtypes (bool, int, uint, float): object, void, complex,
datetime and structured dtypes are refused, as are arrays whose byte count does not match their shape, frames
larger than the limit and frames that are not msgpack. Every refusal is a WireError saying what was expected and
what came.
"""
from __future__ import annotations

import io
from typing import Any

import msgpack
import numpy as np

#: numpy dtype kinds that may cross the wire: bool, signed and unsigned integers, floats
NUMERIC_KINDS = frozenset("biuf")
STYLES = ("openpi", "vla-eval")
#: default cap on one message, both directions (a 256x256x3 frame is 192 KiB; a batch of them a few MiB)
DEFAULT_MAX_BYTES = 64 << 20


class WireError(ValueError):
    """A message that does not follow the protocol; the text says what was expected and what was received."""


def _array_map(array: np.ndarray, style: str) -> dict:
    if array.dtype.kind not in NUMERIC_KINDS or array.dtype.fields is not None:
        raise WireError(f"refusing to send an array of dtype {array.dtype}: only bool, int, uint and float "
                        "arrays cross the wire")
    array = np.ascontiguousarray(array)
    if style == "openpi":
        return {b"__ndarray__": True, b"data": array.tobytes(), b"dtype": array.dtype.str, b"shape": array.shape}
    return {"__ndarray__": True, "data": array.tobytes(), "dtype": array.dtype.str, "shape": list(array.shape)}


def pack(value: Any, style: str = "openpi") -> bytes:
    """value (dicts, lists, str, numbers, numpy arrays and scalars) -> one msgpack message in `style`'s spelling."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid: {', '.join(STYLES)}")

    def default(obj):
        if isinstance(obj, np.ndarray):
            return _array_map(obj, style)
        if isinstance(obj, np.generic):  # scalars go as plain msgpack numbers, which both readers take
            if obj.dtype.kind not in NUMERIC_KINDS:
                raise WireError(f"refusing to send a numpy scalar of dtype {obj.dtype}")
            return obj.item()
        raise WireError(f"cannot send a {type(obj).__name__}: only dicts, lists, strings, numbers and numeric "
                        "numpy arrays cross the wire")

    return msgpack.packb(value, default=default, use_bin_type=True)


def _text(key) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key


def _decode_array(obj: dict) -> np.ndarray:
    fields = {_text(k): v for k, v in obj.items()}
    data, dtype, shape = fields.get("data"), fields.get("dtype"), fields.get("shape")
    if not isinstance(data, bytes) or not isinstance(dtype, (str, bytes)) or not isinstance(shape, (list, tuple)):
        raise WireError(f"malformed array: expected data (bytes), dtype (str) and shape (list), got "
                        f"{type(data).__name__}, {type(dtype).__name__}, {type(shape).__name__}")
    try:
        parsed = np.dtype(_text(dtype))
    except (TypeError, ValueError):
        raise WireError(f"unknown array dtype {_text(dtype)!r}") from None
    if parsed.kind not in NUMERIC_KINDS or parsed.fields is not None or parsed.subdtype is not None:
        raise WireError(f"refused array dtype {parsed} (kind {parsed.kind!r}): only bool, int, uint and float "
                        "arrays are accepted")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise WireError(f"malformed array shape {list(shape)!r}: expected non-negative integers")
    expected = int(np.prod(shape, dtype=np.int64)) * parsed.itemsize
    if expected != len(data):
        raise WireError(f"array of shape {list(shape)} and dtype {parsed} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=parsed).reshape(shape).copy()


def _decode_image(obj: dict) -> np.ndarray:
    fields = {_text(k): v for k, v in obj.items()}
    fmt = _text(fields.get("format"))
    if fmt == "raw":
        return _decode_array(fields)
    if fmt not in ("png", "jpeg") or not isinstance(fields.get("data"), bytes):
        raise WireError(f"malformed image: expected format raw, png or jpeg with bytes data, got format {fmt!r}")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(fields["data"]), formats=[fmt.upper()]) as image:
            return np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB", "RGBA") else image)
    except Exception as e:  # Pillow raises several types (including its decompression-bomb error)
        raise WireError(f"undecodable {fmt} image: {e}") from None


def _object_hook(obj: dict) -> Any:
    marks = {_text(k) for k in obj if isinstance(k, (str, bytes))}
    if "__ndarray__" in marks:
        return _decode_array(obj)
    if "__image__" in marks:
        return _decode_image(obj)
    if "__npgeneric__" in marks:  # openpi's numpy scalars: a plain number and its dtype
        fields = {_text(k): v for k, v in obj.items()}
        data = fields.get("data")
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise WireError(f"malformed numpy scalar: expected a number in 'data', got {type(data).__name__}")
        return _decode_array({"data": b"", "dtype": fields.get("dtype"), "shape": [0]}).dtype.type(data)
    return obj


def _ext_hook(code: int, data: bytes):
    raise WireError(f"refused msgpack extension type {code}: only plain msgpack and numeric arrays are accepted")


def unpack(message: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """One received frame -> Python values with numpy arrays; WireError for anything else."""
    if isinstance(message, str):
        raise WireError(f"expected a binary msgpack frame, received a text frame: {message[:500]!r}")
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a binary msgpack frame, received {type(message).__name__}")
    if len(message) > max_bytes:
        raise WireError(f"message of {len(message)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        # strict_map_key=False: openpi's arrays are maps with bytes keys
        return msgpack.unpackb(bytes(message), object_hook=_object_hook, ext_hook=_ext_hook, raw=False,
                               strict_map_key=False)
    except WireError:
        raise
    except Exception as e:  # msgpack raises ExtraData, FormatError, StackError, ValueError, ...
        raise WireError(f"expected a msgpack message, received {len(message)} bytes that are not one "
                        f"({type(e).__name__}: {e}); first bytes {bytes(message[:16])!r}") from None
