"""Just enough protobuf wire format to read one integer field of a SentencePiece model
(so that no protobuf package is needed)."""
from __future__ import annotations


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, value


def field_varint(buf: bytes, path: list[int], default: int | None = None) -> int | None:
    """The integer at ``path`` (field numbers of nested messages, then the integer's)."""
    *outer, last = path
    for num in outer:
        buf = next((v for n, w, v in _fields(buf) if n == num and w == 2), None)
        if buf is None:
            return default
    return next((v for n, w, v in _fields(buf) if n == last and w == 0), default)
