"""Files that come from outside (downloads, git clones), checked before anything uses them.

A download can stop part way, a clone made without git-lfs holds small text pointers
instead of the large files, and a downloader can save an HTML error page under the
file's name. Each reader here says which of these a file is, naming the file and
the fix, instead of failing later with a traceback (a bare MemoryError when the
first 8 bytes of a pointer are read as a safetensors header length of 2e18).

    read_json(path)                 the JSON of a file that must be JSON
    JsonFields(data, path)          typed reads of a JSON object's fields (config.json)
    safetensors_header(path)        a safetensors file's tensors, its framing checked
    open_safetensors(path)          safetensors' reader on a checked file

Every problem is an :class:`InputFileError`: a :class:`~fmtrain.errors.UserError`
(one ``error:`` line) and a ValueError (what callers of the loaders catch).
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from .errors import UserError

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_HTML = re.compile(rb"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>]|head[\s>]|body[\s>])", re.I | re.S)
SNIFF_BYTES = 1024
# safetensors' own limit: a larger header length is no safetensors file whatever the file's size.
MAX_HEADER_BYTES = 100_000_000
_MISSING = object()  # the default of a field that has none: it is needed


class InputFileError(UserError, ValueError):
    """A file read from outside is damaged, not what its name says, or holds a field of the wrong type."""


def where(path: Path) -> str:
    """``NAME in FOLDER``: the file first, so that the name stays visible in a long path."""
    return f"{path.name} in {path.parent}"


def impostor(head: bytes, path: Path, what: str) -> str | None:
    """What a file beginning with ``head`` is instead of ``what``, with the fix; None when it is neither
    a Git LFS pointer nor an HTML page."""
    if head.startswith(LFS_POINTER):
        return (f"{where(path)} is a Git LFS pointer, not the {what} (a clone made without git-lfs): "
                f"run `git lfs pull` in {path.parent}")
    if _HTML.match(head.removeprefix(b"\xef\xbb\xbf")):
        return f"{where(path)} is an HTML page, not the {what} (a failed download): download it again"
    return None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The JSON in ``path``; a file that is not JSON is one InputFileError saying what it is instead."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if (instead := impostor(raw[:SNIFF_BYTES], path, what)) is not None:
        raise InputFileError(instead)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text at byte {exc.start}"
    except json.JSONDecodeError as exc:
        problem = f"not valid JSON: {exc.msg.removesuffix(' at')} at char {exc.pos}"
    raise InputFileError(f"{where(path)} is damaged ({problem}); download it again")


# --------------------------------------------------------------------------- JSON fields
def found(value: Any) -> str:
    """A JSON value as a message shows it: ``"768" (a string)``."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value))
    return f"{text} ({kind})" if kind else text


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class JsonFields:
    """Typed reads of the fields of a JSON object read from ``path``.

    A field of the wrong type or out of range is one InputFileError naming the file, the
    field and what was found. ``null`` counts as absent: the default where there is one
    (transformers writes ``"rope_scaling": null``), an error where the field is needed.
    ``names``: how a key is named in messages, where it is not ``prefix + key``.
    """

    def __init__(self, data: Any, path: Path, names: dict[str, str] | None = None, prefix: str = ""):
        self.path, self.names, self.prefix = Path(path), names or {}, prefix
        if not isinstance(data, dict):
            whole = f"{self.path} must hold" if not prefix else f"{self.path}: {prefix.rstrip('.')} must be"
            raise InputFileError(f"{whole} a JSON object (a mapping), found {found(data)}")
        self.data = data

    def name(self, key: str) -> str:
        return self.names.get(key, self.prefix + key)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _read(self, key: str, default: Any, expected: str, ok) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is not _MISSING:
                return default
            if key not in self.data:
                raise InputFileError(f"{self.path}: {self.name(key)} is missing (it must be {expected})")
        if not ok(value):
            raise InputFileError(f"{self.path}: {self.name(key)} must be {expected}, found {found(value)}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, min: int = 1) -> Any:
        expected = "a positive integer" if min == 1 else f"an integer >= {min}"
        value = self._read(key, default, expected, lambda v: _is_int(v) and v >= min)
        return int(value) if isinstance(value, float) else value

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = True) -> Any:
        """The value as written (an int stays an int): finite and, if ``positive``, above 0."""
        expected = "a positive number" if positive else "a number"
        return self._read(key, default, expected, lambda v: _is_number(v) and (not positive or v > 0))

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        return self._read(key, default, "true or false", lambda v: isinstance(v, bool))

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self._read(key, default, "a string", lambda v: isinstance(v, str))

    def strings(self, key: str) -> list[str]:
        """A list of strings; [] when absent."""
        return self._read(key, [], "a list of strings",
                          lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))

    def mapping(self, key: str) -> "JsonFields":
        """The fields of a nested object; none when absent."""
        return JsonFields(self._read(key, {}, "a mapping", lambda v: True), self.path, prefix=self.name(key) + ".")


# --------------------------------------------------------------------------- safetensors
def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The tensors of a safetensors file (name -> dtype, shape, data_offsets), checked before its
    header is read: the 8-byte header length fits the file, the header is JSON, the data is all there."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
            n = _header_length(head, size, path)
            fh.seek(8)
            raw = fh.read(n)
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    header = _parse_header(raw, path)
    header.pop("__metadata__", None)
    end = 8 + n + max((t["data_offsets"][1] for t in header.values()), default=0)
    if size < end:
        raise InputFileError(f"{path} is truncated ({size} of {end} bytes): its tensors "
                             f"{', '.join(sorted(header)[:3])}... are incomplete; download it again")
    return header


def _header_length(head: bytes, size: int, path: Path) -> int:
    if (instead := impostor(head, path, "weights")) is not None:
        raise InputFileError(instead)
    if size < 8:
        raise InputFileError(f"{where(path)} is not a safetensors file ({size} bytes, shorter than the 8-byte "
                             "header length it starts with); download it again")
    (n,) = struct.unpack("<Q", head[:8])
    if n > size - 8:
        problem = f"header length {n} > file size {size}"
    elif n > MAX_HEADER_BYTES:
        problem = f"header length {n} is over safetensors' limit of {MAX_HEADER_BYTES} bytes"
    else:
        return n
    raise InputFileError(f"{where(path)} is not a safetensors file ({problem}); download it again")


def _parse_header(raw: bytes, path: Path) -> dict[str, dict]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{where(path)} is not a safetensors file (its {len(raw)}-byte header is not "
                             f"JSON: {exc}); download it again") from None
    if not isinstance(header, dict):
        raise InputFileError(f"{where(path)} is not a safetensors file (its header is {found(header)}, not a "
                             "JSON object); download it again")
    for name, info in header.items():
        if name != "__metadata__" and not _is_tensor_entry(info):
            raise InputFileError(f"{where(path)} is damaged: its header's entry {name!r} is not a tensor "
                                 f"(dtype, shape, data_offsets), found {found(info)}; download it again")
    return header


def _is_tensor_entry(info: Any) -> bool:
    def ints(v):
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)

    return (isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape"))
            and ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2
            and info["data_offsets"][0] <= info["data_offsets"][1])


def open_safetensors(path: str | Path):
    """``safetensors.safe_open`` (torch tensors) of a file that :func:`safetensors_header` accepts."""
    from safetensors import SafetensorError, safe_open

    safetensors_header(path)
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as exc:  # e.g. a dtype this safetensors does not know
        raise InputFileError(f"{path} cannot be read by safetensors: {exc}") from None


__all__ = ["InputFileError", "JsonFields", "read_json", "safetensors_header", "open_safetensors", "impostor",
           "found", "where", "LFS_POINTER"]
