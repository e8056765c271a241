"""Reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or raw.

An IDX file starts with a 4-byte magic ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian
int32 sizes, then the values in C order.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from offramp.errors import DataError

__all__ = ["find_idx_file", "load_mnist", "read_idx"]

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path, *, expect_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw, detected from the content) into a NumPy array.

    Args:
        path: the file.
        expect_magic: when given, the 4-byte magic the file must have (e.g. ``0x803`` for
            MNIST images, ``0x801`` for labels).

    Raises:
        DataError: missing file, bad gzip stream, wrong magic, or a size that does not match
            the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} looks gzipped but does not decompress: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is too short ({len(raw)} bytes) to be an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file: bad magic number 0x{magic:08x}")
    if expect_magic is not None and magic != expect_magic:
        raise DataError(
            f"{path} has magic 0x{magic:08x} but 0x{expect_magic:08x} was expected "
            "(images are 0x00000803, labels 0x00000801); are the files swapped?"
        )
    ndim, dtype = raw[3], _DTYPES[raw[2]]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    want = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != want:
        raise DataError(
            f"{path} is corrupt: its header promises shape {dims} ({want} bytes of data) but "
            f"it holds {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def find_idx_file(directory: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in ``directory``; a clear error naming both when neither exists."""
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"neither {stem}.gz nor {stem} found in {directory}")


def load_mnist(
    directory: str | Path, split: str = "train", *, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """Load an MNIST-format split (MNIST, Fashion-MNIST) from a directory of IDX files.

    Args:
        directory: holds ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``.
        split: ``"train"`` or ``"test"``.
        limit: keep only the first ``limit`` samples.

    Returns:
        ``(X, y)``: images ``(N, 1, H, W)`` float32 in [0, 1] and labels ``(N,)`` int64.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"MNIST directory {directory} does not exist")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(find_idx_file(directory, f"{prefix}-images-idx3-ubyte"), expect_magic=0x803)
    labels = read_idx(find_idx_file(directory, f"{prefix}-labels-idx1-ubyte"), expect_magic=0x801)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{directory}: {images.shape[0]} {split} images but {labels.shape[0]} labels"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]  # (N, H, W) -> (N, 1, H, W)
    return x, torch.from_numpy(labels.astype(np.int64))
