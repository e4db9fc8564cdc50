"""Envelopes and payload fields: round trips and malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from secureinfer import codec
from secureinfer.errors import EnvelopeError

DIGEST = bytes(range(16))


def test_envelope_round_trip():
    msg = codec.seal(codec.Kind.INPUT, "ckks", DIGEST, b"payload")
    assert msg.startswith(b"secureinfer")
    env = codec.open_envelope(msg, kind=codec.Kind.INPUT, scheme="ckks", digest=DIGEST)
    assert env.payload == b"payload" and env.scheme == "ckks"


@pytest.mark.parametrize("mutate, match", [
    (lambda m: b"X" + m[1:], "magic"),
    (lambda m: m[:-1], "payload"),
    (lambda m: m + b"\0", "payload"),
    (lambda m: m[:12], "truncated"),
    (lambda m: m[:11] + b"\x09\x00" + m[13:], "version"),
])
def test_envelope_malformed(mutate, match):
    msg = codec.seal(codec.Kind.INPUT, "ckks", DIGEST, b"payload")
    with pytest.raises(EnvelopeError, match=match):
        codec.open_envelope(mutate(msg))


def test_envelope_mismatches_named():
    msg = codec.seal(codec.Kind.OUTPUT, "bfv", DIGEST, b"")
    with pytest.raises(EnvelopeError, match="INPUT"):
        codec.open_envelope(msg, kind=codec.Kind.INPUT)
    with pytest.raises(EnvelopeError, match="bfv"):
        codec.open_envelope(msg, scheme="ckks")
    with pytest.raises(EnvelopeError, match="parameters differ"):
        codec.open_envelope(msg, digest=b"\1" * 16)


def test_fields_round_trip():
    big = np.array([[2**100, -3], [5, -(2**70)]], dtype=object)
    fields = {"raw": b"\x00\x01", "list": [b"a", b"", b"ccc"], "f": np.arange(6.0).reshape(2, 3),
              "i": np.array([-1, 2], dtype=np.int64), "n": 2**90, "s": "héllo", "big": big}
    out = codec.unpack_fields(codec.pack_fields(fields))
    assert out["raw"] == b"\x00\x01" and out["list"] == [b"a", b"", b"ccc"]
    np.testing.assert_array_equal(out["f"], fields["f"])
    assert out["i"].dtype == np.int64 and out["n"] == 2**90 and out["s"] == "héllo"
    assert out["big"].tolist() == big.tolist()


def test_fields_reject_object_arrays_of_non_ints_and_pickles():
    with pytest.raises((TypeError, ValueError)):
        codec.pack_fields({"x": np.array(["a"], dtype=object)})
    with pytest.raises(TypeError):
        codec.pack_fields({"x": {"a": 1}})


@pytest.mark.parametrize("cut", [1, 5, 17, 30])
def test_fields_truncated_is_envelope_error(cut):
    data = codec.pack_fields({"f": np.arange(4.0), "l": [b"abc"]})
    with pytest.raises(EnvelopeError):
        codec.unpack_fields(data[:-cut])


def test_fields_trailing_bytes_rejected():
    with pytest.raises(EnvelopeError, match="trailing"):
        codec.unpack_fields(codec.pack_fields({"a": b"x"}) + b"!")


def test_fields_object_dtype_in_header_rejected():
    data = bytearray(codec.pack_fields({"a": np.zeros(2)}))
    i = data.index(b"<f8")
    data[i: i + 3] = b"|O8"[:3]
    with pytest.raises(EnvelopeError):
        codec.unpack_fields(bytes(data))


def test_fields_huge_length_is_error_not_allocation():
    data = bytearray(codec.pack_fields({"l": [b"a"]}))
    # list count field: after name (2+1 bytes), count header (4) and tag (1)
    data[8:16] = (2**60).to_bytes(8, "little")
    with pytest.raises(EnvelopeError):
        codec.unpack_fields(bytes(data))


def test_fields_unknown_dtype_is_envelope_error():
    data = bytearray(codec.pack_fields({"a": np.zeros(2)}))
    i = data.index(b"<f8")
    data[i: i + 3] = b"<q9"  # not a numpy dtype
    with pytest.raises(EnvelopeError, match="unknown dtype"):
        codec.unpack_fields(bytes(data))


def test_fields_overflowing_shape_is_envelope_error():
    data = bytearray(codec.pack_fields({"a": np.zeros(2)}))
    i = data.index(b"<f8") + 3 + 1  # dtype text, then ndim, then the shape
    data[i: i + 8] = (2**63 + 2).to_bytes(8, "little")
    with pytest.raises(EnvelopeError, match="do not fill|dimension over"):
        codec.unpack_fields(bytes(data))
