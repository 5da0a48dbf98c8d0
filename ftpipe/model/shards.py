"""Safetensors model folders read and written one tensor at a time, so that a merge never holds a model,
nor even a whole shard.

The format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}} padded with
spaces, then the tensors' bytes back to back (offsets count from the end of the header). Every tensor's
size is known from the base's header before any byte is read, so `ShardWriter` writes the header first
and then streams each tensor's bytes: what it holds at any time is the tensor at hand, and a tensor that
stays as it is goes from file to file through a 64 MiB buffer (`copy_tensor_bytes`).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from ftpipe.core.errors import PipelineError
from ftpipe.core.io import write_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
COPY_CHUNK = 64 << 20   # bytes per read when copying a tensor unchanged: flat memory, few system calls
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; `begin` counts from the end of the header."""
    name: str
    dtype: str          # the safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int
    nbytes: int


@dataclass(frozen=True)
class Shard:
    path: Path
    tensors: list[TensorInfo]   # in file order
    data_start: int             # absolute offset of the first tensor byte
    metadata: dict[str, str]


def read_shard(path: Path) -> Shard:
    """The header of one safetensors file (no tensor byte is read)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    metadata = header.pop("__metadata__", None) or {}
    tensors = sorted((TensorInfo(name, entry["dtype"], tuple(entry["shape"]), entry["data_offsets"][0],
                                 entry["data_offsets"][1] - entry["data_offsets"][0])
                      for name, entry in header.items()), key=lambda info: info.begin)
    return Shard(Path(path), tensors, 8 + length, metadata)


def model_shards(model_dir: Path) -> tuple[list[Shard], bool]:
    """(the shards of a model folder in file order, whether it is sharded with an index): model.safetensors,
    or the files model.safetensors.index.json names, each checked to hold exactly the tensors the index
    maps to it."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (model_dir / name).exists()]
        if missing:
            raise PipelineError(f"{index_path} names shards that are not in {model_dir}: {missing}. "
                                "Rebuild the folder (dvc repro base).")
        shards = [read_shard(model_dir / name) for name in files]
        for shard in shards:
            listed = {tensor for tensor, file in weight_map.items() if file == shard.path.name}
            held = {info.name for info in shard.tensors}
            if listed != held:
                raise PipelineError(f"{shard.path}: holds {len(held)} tensors but {index_path} maps {len(listed)} "
                                    f"to it (e.g. {sorted(listed ^ held)[:3]}). Rebuild the folder (dvc repro base).")
        return shards, True
    if (model_dir / SINGLE_FILE).exists():
        return [read_shard(model_dir / SINGLE_FILE)], False
    raise PipelineError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}: the merge reads safetensors "
                        "weights only. Rebuild it with `dvc repro base`.")


class ShardWriter:
    """A safetensors file written tensor by tensor, in the order of `tensors` [(name, dtype, shape)]: the
    header first, then each tensor's bytes (`write` or `copy`). It is written under a temporary name and
    renamed into place only when every tensor is complete, so a file with its final name is never partial."""

    def __init__(self, path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = Path(path)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.sizes: list[tuple[str, int]] = []
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in tensors:
            nbytes = DTYPE_BYTES[dtype] * _count(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.sizes.append((name, nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)   # the data starts 8-byte aligned, as safetensors writes it
        self.total = offset
        self.handle: BinaryIO = open(self.partial, "wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self.next = 0

    def _start(self, name: str) -> int:
        expected, nbytes = self.sizes[self.next]
        if name != expected:
            raise RuntimeError(f"{self.path.name}: tensor {name!r} written where {expected!r} belongs")
        self.next += 1
        return nbytes

    def write(self, name: str, blocks: Iterable) -> None:
        """Tensor `name`'s bytes, given as CPU torch tensors (or buffers) that together hold exactly them."""
        nbytes, written = self._start(name), 0
        for block in blocks:
            data = memoryview(_as_bytes(block)).cast("B")
            self.handle.write(data)
            written += len(data)
        if written != nbytes:
            raise RuntimeError(f"{self.path.name}: tensor {name!r} got {written} bytes, its header says {nbytes}")

    def copy(self, name: str, source: BinaryIO, offset: int) -> None:
        """Tensor `name`'s bytes copied unchanged from `source` at `offset`."""
        remaining = self._start(name)
        source.seek(offset)
        while remaining:
            chunk = source.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise PipelineError(f"{source.name}: ends inside tensor {name!r}: the file is truncated")
            self.handle.write(chunk)
            remaining -= len(chunk)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.handle.close()
        if kind is None and self.next < len(self.sizes):
            self.partial.unlink(missing_ok=True)
            raise RuntimeError(f"{self.path.name}: {len(self.sizes) - self.next} tensors never written")
        if kind is not None:
            self.partial.unlink(missing_ok=True)
            return   # the error goes on
        os.replace(self.partial, self.path)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _as_bytes(block):
    """A CPU tensor's raw bytes (any dtype: bfloat16 has no numpy type, its uint8 view has), or a buffer."""
    if hasattr(block, "view") and hasattr(block, "is_contiguous"):   # a torch tensor
        return block.contiguous().reshape(-1).view(dtype=_uint8()).numpy()
    return block


def _uint8():
    import torch

    return torch.uint8


def write_index(out_dir: Path, shards: list[tuple[str, list[tuple[str, int]]]]) -> None:
    """model.safetensors.index.json for shards [(file name, [(tensor, nbytes)])]: transformers' layout."""
    weight_map = {tensor: file for file, tensors in shards for tensor, _ in tensors}
    total = sum(nbytes for _, tensors in shards for _, nbytes in tensors)
    write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
