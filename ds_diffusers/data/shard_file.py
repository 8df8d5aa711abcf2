"""One safetensors file written batch by batch, for the encoder cache: each batch of a rank's share
goes straight to its place in the file, so a build holds one batch in memory however large the
dataset is (it used to hold the whole share, and a second copy while concatenating it).

safetensors' layout is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the tensors' bytes back to back. With the row count known up
front and each tensor's row shape and dtype taken from the first batch, every row's place in the
file is known before it is encoded. The result is an ordinary safetensors file (`safe_open` reads it).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

# safetensors' names for the dtypes the caches store.
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class ShardWriter:
    """`with ShardWriter(path, num_rows) as writer: writer.write(batch)`, with `batch` a dict of
    tensors that share their first dimension; every batch has the same names, row shapes and dtypes,
    and the batches add up to `num_rows` rows. No batch at all writes a file without tensors."""

    def __init__(self, path: Path, num_rows: int) -> None:
        self.path = path
        self.num_rows = num_rows
        self.rows_written = 0
        self._file: BinaryIO | None = None
        self._places: dict[str, tuple[int, int]] = {}  # name -> (file offset of row 0, bytes per row)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        elif self._file is not None:
            self._file.close()

    def write(self, batch: dict[str, torch.Tensor]) -> None:
        rows = {tensor.shape[0] for tensor in batch.values()}
        if len(rows) != 1:
            raise ValueError(f"a batch's tensors must share their first dimension, got {sorted(rows)}")
        count = rows.pop()
        if self._file is None:
            self._start(batch)
        if set(batch) != set(self._places) or self.rows_written + count > self.num_rows:
            raise ValueError(f"batch {sorted(batch)} of {count} rows does not fit {self.path.name} "
                             f"({sorted(self._places)}, {self.rows_written} of {self.num_rows} rows written)")
        for name, tensor in batch.items():
            start, row_bytes = self._places[name]
            data = tensor.detach().cpu().contiguous()  # a VAE with mid-block attention returns channels-last posteriors
            if data.nbytes != count * row_bytes:
                raise ValueError(f"{name}: {tuple(data.shape)} {data.dtype} does not match the first batch's rows")
            self._file.seek(start + self.rows_written * row_bytes)
            self._file.write(data.view(torch.uint8).numpy().data)  # bf16 has no numpy dtype; its bytes do
        self.rows_written += count

    def close(self) -> None:
        if self._file is None:
            self._write_header({})
        if self.rows_written != self.num_rows:
            self._file.close()
            raise ValueError(f"{self.path.name}: {self.rows_written} rows written of {self.num_rows}")
        self._file.close()

    def _start(self, batch: dict[str, torch.Tensor]) -> None:
        header, row_bytes, offset = {}, {}, 0
        for name in sorted(batch):
            tensor = batch[name]
            if tensor.dtype not in _DTYPE_NAMES:
                raise ValueError(f"{name}: dtype {tensor.dtype} is not one the cache stores")
            row_bytes[name] = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
            size = row_bytes[name] * self.num_rows
            header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": [self.num_rows, *tensor.shape[1:]],
                            "data_offsets": [offset, offset + size]}
            offset += size
        base = self._write_header(header)
        self._places = {name: (base + header[name]["data_offsets"][0], row_bytes[name]) for name in header}
        self._file.truncate(base + offset)  # the full size now: each batch lands at its offsets

    def _write_header(self, header: dict) -> int:
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close() or __exit__)
        self._file.write(struct.pack("<Q", len(text)) + text)
        return 8 + len(text)
