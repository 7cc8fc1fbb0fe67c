"""Safetensors shards written tensor by tensor, so that a checkpoint larger than memory can be
written while it is computed (`qmamba quantize --low-memory`): each shard reserves room for its
header, takes tensors (whole, or as a sequence of row chunks) as they come, and writes its header
when it is closed. The files are ordinary safetensors (the header is JSON padded with spaces to
its reserved size, which the format allows), named as transformers names shards
(model-00001-of-00003.safetensors; a single shard is model.safetensors), with an index.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor

HEADER_BYTES = 1 << 20                  # reserved per shard: ~5,000 tensor entries
DEFAULT_SHARD_BYTES = 5 * 10 ** 9       # transformers' default max_shard_size ("5GB")
_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


class ShardWriter:
    """Tensors -> numbered safetensors files in `folder`; `close()` names them and returns the
    weight map {tensor: file}."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "model"):
        self.folder, self.max_bytes, self.prefix = Path(folder), max_bytes, prefix
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}          # tensor -> shard number (0-based)
        self.total_size = 0
        self._f = None
        self._header: dict = {}
        self._offset = 0

    def _open(self) -> None:
        self._close_shard()
        path = self.folder / f".{self.prefix}-shard{len(self.files):05d}.tmp"
        self.files.append(path)
        self._f = open(path, "wb")
        self._f.write(b"\0" * (8 + HEADER_BYTES))
        self._header, self._offset = {"__metadata__": {"format": "pt"}}, 0

    def _close_shard(self) -> None:
        if self._f is None:
            return
        head = json.dumps(self._header, separators=(",", ":")).encode()
        if len(head) > HEADER_BYTES:           # add() opens a new shard long before this
            raise RuntimeError("safetensors header larger than its reserved room")
        self._f.seek(0)
        self._f.write(struct.pack("<Q", HEADER_BYTES) + head + b" " * (HEADER_BYTES - len(head)))
        self._f.close()
        self._f = None

    def add(self, name: str, tensor: Tensor) -> None:
        """One whole tensor."""
        self.add_chunks(name, tuple(tensor.shape), tensor.dtype, [tensor])

    def add_chunks(self, name: str, shape: tuple, dtype: torch.dtype, chunks: Iterable[Tensor]) -> None:
        """One tensor of `shape` and `dtype` given as consecutive slices along dim 0."""
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if self._f is None or (self._offset and self._offset + nbytes > self.max_bytes) or \
                len(json.dumps(self._header)) > HEADER_BYTES - 4096:
            self._open()
        start, written = self._offset, 0
        for c in chunks:
            if c.dtype != dtype:
                raise ValueError(f"{name}: chunk of dtype {c.dtype}, expected {dtype}")
            data = c.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            self._f.write(data.tobytes() if not data.flags.c_contiguous else memoryview(data))
            written += data.nbytes
        if written != nbytes:
            raise ValueError(f"{name}: {written} bytes written for shape {shape} {dtype} ({nbytes} expected)")
        self._offset += nbytes
        self._header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [start, self._offset]}
        self.weight_map[name] = len(self.files) - 1
        self.total_size += nbytes

    def close(self) -> dict[str, str]:
        """Write the last header, give the shards their final names; {tensor: file name}."""
        self._close_shard()
        n = len(self.files)
        names = [f"{self.prefix}.safetensors"] if n == 1 else \
            [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, name in zip(self.files, names):
            os.replace(tmp, self.folder / name)
        return {k: names[i] for k, i in sorted(self.weight_map.items())}

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def index(weight_map: dict[str, str], total_size: int, metadata: Optional[dict] = None) -> dict:
    """The model.safetensors.index.json object."""
    return {"metadata": {"total_size": total_size, **(metadata or {})}, "weight_map": dict(sorted(weight_map.items()))}
