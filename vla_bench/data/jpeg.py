"""JPEG as the reference's TensorFlow pipelines do it: the one home of how frames are encoded and decoded.

OpenVLA's training frames went through TensorFlow's JPEG codec (RLDS storage, `tf.io.decode_image`), and its LIBERO
evaluation repeats the round trip (`tf.image.encode_jpeg` at quality 95 with 4:2:0 chroma, then decode). TensorFlow
decodes with libjpeg's fast integer IDCT (JDCT_IFAST) and "fancy" chroma upsampling. PIL decodes with the accurate
IDCT, which differs from TensorFlow's output by a mean of 1.1 levels, by more than one level on about a quarter of
the values and by up to 14 levels (measured on LIBERO frames against TensorFlow itself). libjpeg-turbo's fast IDCT
through simplejpeg (`fastdct=True`) reproduces TensorFlow's decode; tests/test_image_chain_tf.py checks the whole
chain against TensorFlow's own output, committed as fixtures.

Encoding stays with PIL (libjpeg-turbo, accurate forward DCT, quality 95, 4:2:0), which gives the coefficients that
TensorFlow's encoder gives.
"""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

#: tf.io.encode_jpeg's default quality; its default chroma downsampling is 4:2:0
QUALITY = 95


def encode(image: np.ndarray, quality: int = QUALITY) -> bytes:
    """HxWx3 uint8 -> JPEG bytes at TensorFlow's encode_jpeg defaults."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality,
                                                                        subsampling="4:2:0")
    return buf.getvalue()


def decode(blob: bytes, channels: int = 3) -> np.ndarray:
    """JPEG bytes -> HxWxC uint8 as tf.io.decode_image decodes them (fast integer IDCT, fancy upsampling).

    Raises ValueError on data that is not a valid JPEG (simplejpeg's strict mode), as PIL did."""
    if channels == 1:
        return simplejpeg.decode_jpeg(blob, colorspace="GRAY", fastdct=True, fastupsample=False)
    if channels != 3:
        raise ValueError(f"JPEG frames decode to 1 or 3 channels, asked for {channels}")
    return simplejpeg.decode_jpeg(blob, colorspace="RGB", fastdct=True, fastupsample=False)


def roundtrip(image: np.ndarray, quality: int = QUALITY) -> np.ndarray:
    """Encode and decode back, as the reference's storage of training frames and its evaluation do."""
    return decode(encode(image, quality))
