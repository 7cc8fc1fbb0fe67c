"""A model folder's safetensors weights read lazily: tensor names, shapes and dtypes from the
headers, and tensor data only when asked (one block's tensors, a range of embedding rows),
through safetensors' memory-mapped `safe_open`, each file closed again after the read so that
the mapped pages leave the process (what `qmamba quantize --low-memory` needs: the whole model
is never in memory).

Names are ours (mamba_ssm's `backbone.embedding.weight` renamed, as `load.read_weights` does);
only safetensors can be read this way (a pickled pytorch_model.bin must be unpickled whole).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import QMambaError
from .load import BIN, BIN_INDEX, RENAMES, weight_files

# (rows, d) bytes read at once when embedding rows are gathered or copied
ROW_CHUNK_BYTES = 64 << 20
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class LazyWeights:
    """name -> (file, shape, dtype) of a folder's safetensors checkpoint; data read on demand."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        files = weight_files(folder)
        if any(f.suffix != ".safetensors" for f in files):
            raise QMambaError(f"{folder} holds {BIN_INDEX if len(files) > 1 else BIN}, which cannot be memory-mapped; "
                              "--low-memory reads safetensors only (convert the weights to safetensors)")
        self.folder = folder
        self.where: dict[str, tuple[Path, str]] = {}          # our name -> (file, name in the file)
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        ours = RENAMES.get(name, name)
                        self.where[ours] = (path, name)
                        self.shapes[ours] = tuple(sl.get_shape())
                        self.dtypes[ours] = _DTYPES.get(sl.get_dtype(), torch.float32)
            except (SafetensorError, OSError) as e:
                raise QMambaError(f"cannot read weights {path}: truncated or not a safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self.where)

    def meta(self) -> dict[str, Tensor]:
        """Every tensor as a meta tensor of its shape and dtype (for the loader's key/shape checks)."""
        return {k: torch.empty(self.shapes[k], dtype=self.dtypes[k], device="meta") for k in self.where}

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
        """These tensors, float ones cast to `dtype` (as `load.build_model` casts them)."""
        out: dict[str, Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n][0], []).append(n)
        for path, ns in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for n in ns:
                    t = f.get_tensor(self.where[n][1])
                    out[n] = t.to(dtype) if t.is_floating_point() else t
        return out

    def row_chunks(self, name: str, dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
        """(first row, rows) of a 2-D tensor, cast to `dtype`, ROW_CHUNK_BYTES at a time."""
        rows, cols = self.shapes[name]
        step = max(1, ROW_CHUNK_BYTES // max(1, cols * 4))
        path, inner = self.where[name]
        for a in range(0, rows, step):
            with safe_open(str(path), framework="pt") as f:
                chunk = f.get_slice(inner)[a:min(a + step, rows)]
            yield a, chunk.to(dtype)

    def gather_rows(self, name: str, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """weight[ids] of a 2-D tensor cast to `dtype`, reading only the row chunks that hold an
        id: ids (...) long -> (..., cols), equal to `F.embedding(ids, weight.to(dtype))`."""
        rows, cols = self.shapes[name]
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
            raise QMambaError(f"token id {int(flat.max())} is outside the {rows:,} rows of {name}")
        out = torch.empty(flat.numel(), cols, dtype=dtype)
        step = max(1, ROW_CHUNK_BYTES // max(1, cols * 4))
        path, inner = self.where[name]
        for a in torch.unique(flat // step).tolist():
            lo, hi = a * step, min((a + 1) * step, rows)
            sel = (flat >= lo) & (flat < hi)
            with safe_open(str(path), framework="pt") as f:
                chunk = f.get_slice(inner)[lo:hi]
            out[sel] = chunk[flat[sel] - lo].to(dtype)
        return out.reshape(*ids.shape, cols)

    def equal(self, a: str, b: str) -> bool:
        """Whether two 2-D tensors hold the same values (compared chunk by chunk)."""
        if self.shapes[a] != self.shapes[b]:
            return False
        return all(torch.equal(x, y) for (_, x), (_, y) in zip(self.row_chunks(a, self.dtypes[a]),
                                                               self.row_chunks(b, self.dtypes[b])))
