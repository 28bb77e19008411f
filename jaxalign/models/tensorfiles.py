"""Reading and writing safetensors files without pickle, lazily, bf16 included.

The format: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
raw little-endian tensor bytes. Tensors are memory-mapped, so slicing one reads only the
bytes of that slice: a sharded loader never holds a whole model in host memory.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from jaxalign.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _is_ints(value, n: int | None = None) -> bool:
    return (isinstance(value, list) and (n is None or len(value) == n)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _check_entry(path: str, name: str, entry) -> None:
    """CheckpointError unless a header entry has dtype, shape (ints) and data_offsets ([begin, end], begin <= end)."""
    if not isinstance(entry, dict):
        problem = f"is {entry!r}, not a mapping"
    elif "dtype" not in entry or "shape" not in entry or "data_offsets" not in entry:
        problem = f"lacks {', '.join(repr(k) for k in ('dtype', 'shape', 'data_offsets') if k not in entry)}"
    elif not _is_ints(entry["shape"]):
        problem = f"has shape {entry['shape']!r}, not a list of sizes"
    elif not _is_ints(entry["data_offsets"], 2) or entry["data_offsets"][0] > entry["data_offsets"][1]:
        problem = f"has data_offsets {entry['data_offsets']!r}, not [begin, end]"
    else:
        return
    raise CheckpointError(f"{path} is corrupt: the header entry of tensor {name!r} {problem}; "
                          "re-download or re-export the file")


class SafetensorsFile:
    """One .safetensors file: `names()`, `shape(name)`, and `tensor(name)` (a memmap view)."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds file size {size}")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}); re-download or re-export it"
            ) from e
        self._data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        data_len = size - self._data_start
        for name, e in header.items():
            _check_entry(path, name, e)
            begin, end = e["data_offsets"]
            if e["dtype"] not in _DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
            expected = int(np.prod(e["shape"], dtype=np.int64)) * _DTYPES[e["dtype"]].itemsize
            if end > data_len or end - begin != expected:
                raise CheckpointError(
                    f"{path} is truncated or corrupt: tensor {name} spans bytes [{begin}, {end}) "
                    f"but the data section has {data_len} bytes; re-download or re-export the file"
                )
        self._mmap = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def tensor(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (no bytes read until sliced)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self._entries[name]
        begin, end = e["data_offsets"]
        buf = self._mmap[self._data_start + begin : self._data_start + end]
        return buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays (bf16 via ml_dtypes allowed) as one safetensors file, atomically."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise TypeError(f"tensor {name}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
