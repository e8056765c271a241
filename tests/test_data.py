import gzip
import struct

import numpy as np
import pytest
import torch

from offramp.data import load_digits_splits, load_mnist, read_idx
from offramp.errors import ConfigError, DataError

from .conftest import data_dir


def _write_idx(path, arr: np.ndarray, code: int = 0x08, compress: bool = False):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(
        struct.pack(">I", d) for d in arr.shape
    )
    raw = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip(tmp_path, compress):
    imgs = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", imgs, compress=compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress=compress)
    x, y = load_mnist(tmp_path, "test")
    assert x.shape == (7, 1, 28, 28) and y.tolist() == list(range(7))
    np.testing.assert_allclose(x[:, 0].numpy(), imgs / 255.0, rtol=1e-6)
    assert load_mnist(tmp_path, "test", limit=3)[0].shape[0] == 3


def test_idx_other_dtypes(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    _write_idx(tmp_path / "f.idx", a, code=0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), a)


def test_corrupt_idx_files(tmp_path):
    imgs = np.zeros((4, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "a", imgs)
    data = (tmp_path / "a").read_bytes()
    (tmp_path / "trunc").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"trunc is corrupt.*\(4, 28, 28\).*3136 bytes.*3126"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x12\x34\x08\x03" + data[4:])
    with pytest.raises(DataError, match="bad magic number 0x12340803"):
        read_idx(tmp_path / "magic")
    with pytest.raises(DataError, match="0x00000801 was expected"):
        read_idx(tmp_path / "a", expect_magic=0x801)
    (tmp_path / "badgz").write_bytes(b"\x1f\x8b" + b"junk" * 4)
    with pytest.raises(DataError, match="does not decompress"):
        read_idx(tmp_path / "badgz")
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope")


def test_missing_and_mismatched_files(tmp_path):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz nor"):
        load_mnist(tmp_path, "test")
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))
    with pytest.raises(DataError, match="3 train images but 2 labels"):
        load_mnist(tmp_path, "train")
    with pytest.raises(DataError, match="split"):
        load_mnist(tmp_path, "val")


def test_real_mnist_test_split():
    x, y = load_mnist(data_dir("mnist"), "test")
    assert x.shape == (10_000, 1, 28, 28) and y.shape == (10_000,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert np.bincount(y.numpy()).tolist()[:3] == [980, 1135, 1032]


def test_digits_splits():
    s = load_digits_splits(seed=0)
    n = sum(part[0].shape[0] for part in (s.train, s.val, s.test))
    assert n == 1797
    assert s.train[0].shape[1:] == (1, 8, 8) and float(s.train[0].max()) <= 1.0
    assert set(s.test[1].tolist()) == set(range(10))
    with pytest.raises(ConfigError, match="sum to less than 1"):
        load_digits_splits(0.6, 0.5)


def test_digits_resized():
    small, big = load_digits_splits(seed=0), load_digits_splits(seed=0, size=16)
    assert big.test[0].shape == (small.test[0].shape[0], 1, 16, 16)
    assert torch.equal(big.test[1], small.test[1])  # same split, same order
    assert 0.0 <= float(big.test[0].min()) and float(big.test[0].max()) <= 1.0
    want = torch.nn.functional.interpolate(small.test[0], size=(16, 16), mode="bilinear")
    assert torch.equal(big.test[0], want)
    with pytest.raises(ConfigError, match="size"):
        load_digits_splits(size=0)
