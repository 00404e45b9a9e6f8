"""Which files an ONNX graph reads as external data — without onnx, and without reading the data.

An ``.onnx`` file is a protobuf ``ModelProto``. A tensor (``TensorProto``) whose data lives in
another file carries ``external_data`` entries (``location``, ``offset``, ``length``, ...) and
``data_location = EXTERNAL``. Tensors sit in graph initializers, sparse initializers, node
attributes (``Constant``'s value), subgraphs of control-flow nodes, training-info graphs and model
functions. This module walks the protobuf wire format along exactly those fields (numbers from
``onnx.proto``) and returns every ``location`` it finds; every other field, notably the tensors'
``raw_data``, is skipped by its length. The runtime thus needs no ``onnx`` package to refuse a graph
that reads a file its manifest does not list and hash.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from far_sdk.errors import BundleError

# message kind -> {field number: message kind of that (length-delimited) field}
_MODEL, _TRAINING_INFO, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _SPARSE, _TENSOR, _ENTRY = range(9)
_FIELDS: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING_INFO, 25: _FUNCTION},
    _TRAINING_INFO: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},  # external_data: repeated StringStringEntryProto
    _ENTRY: {},
}
_MAX_DEPTH = 64  # nested subgraphs; real models use a handful


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _walk(buf, start: int, end: int, kind: int, depth: int, found: set[str]) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed(f"graphs nested deeper than {_MAX_DEPTH}")
    fields = _FIELDS[kind]
    entry: dict[int, bytes] = {}
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise _Malformed("a field runs past the end of its message")
            if kind == _ENTRY and number in (1, 2):
                entry[number] = buf[pos : pos + length]
            elif number in fields:
                _walk(buf, pos, pos + length, fields[number], depth + 1, found)
            pos += length
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        if pos > end:
            raise _Malformed("a field runs past the end of its message")
    if kind == _ENTRY and entry.get(1) == b"location":
        try:
            found.add(entry.get(2, b"").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _Malformed("an external-data location is not UTF-8") from e


def external_data_files(path: str | os.PathLike) -> set[str]:
    """The ``location`` of every external-data entry of every tensor in the ONNX model at ``path``.

    Raises :class:`BundleError` if the file is not a well-formed protobuf along the walked fields.
    """
    path = Path(path)
    found: set[str] = set()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return found
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                _walk(mm, 0, size, _MODEL, 0, found)
            except _Malformed as e:
                raise BundleError(f"{path} is not a well-formed ONNX model ({e}); re-export the bundle") from None
    return found
