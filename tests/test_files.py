"""offramp.files: the one atomic writer, and reads that never unpickle."""

import errno
import json
import math

import pytest
import torch

from offramp import files
from offramp.errors import DataError, WriteError


def test_writes_replace_the_file_whole(tmp_path):
    p = files.write_json(tmp_path / "sub" / "r.json", {"a": 1, "b": [0.5, None]})
    assert json.loads(p.read_text()) == {"a": 1, "b": [0.5, None]}
    files.write_csv(tmp_path / "h.csv", ["x", "y"], [[1, None], [2, 0.5]])
    assert (tmp_path / "h.csv").read_text() == "x,y\n1,\n2,0.5\n"
    files.save_torch(tmp_path / "t.pt", {"w": torch.ones(2), "n": 3})
    assert torch.equal(files.read_torch(tmp_path / "t.pt")["w"], torch.ones(2))
    assert sorted(q.name for q in tmp_path.iterdir()) == ["h.csv", "sub", "t.pt"]


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    p = files.write_text(tmp_path / "r.json", "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(WriteError, match=r"could not write .*r\.json: No space left on device"):
        files.write_text(p, "new")
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["r.json"]


def test_a_directory_that_cannot_be_made_is_one_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="could not write"):
        files.write_text(tmp_path / "file" / "r.json", "{}")


def test_nan_never_reaches_a_json_file(tmp_path):
    p = files.write_json(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(WriteError, match=r"NaN as JSON \(at rows\[1\]\.cost\)"):
        files.write_json(p, {"rows": [{"cost": 1.0}, {"cost": math.nan}]})
    assert json.loads(p.read_text()) == {"ok": 1}


def test_infinity_is_written_as_a_string_float_reads_back(tmp_path):
    import numpy as np

    p = files.write_json(tmp_path / "r.json", {"tau": [math.inf, np.float64(-math.inf), 0.5]})
    back = files.read_json(p)  # strict: no bare Infinity token in the file
    assert back == {"tau": ["Infinity", "-Infinity", 0.5]}
    assert [float(t) for t in back["tau"]] == [math.inf, -math.inf, 0.5]


def test_numpy_and_tensor_scalars_are_written_as_numbers(tmp_path):
    import numpy as np

    p = files.write_json(tmp_path / "r.json", {"a": np.float64(0.25), "b": torch.tensor(3)})
    assert json.loads(p.read_text()) == {"a": 0.25, "b": 3}
    with pytest.raises(WriteError, match="NaN"):
        files.to_json({"a": np.float32("nan")})


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_read_torch_never_unpickles(tmp_path):
    torch.save({"x": _Payload(tmp_path / "ran")}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="never pickled objects"):
        files.read_torch(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


def test_read_json_refuses_nan_tokens_and_bad_bytes(tmp_path):
    (tmp_path / "n.json").write_text('{"a": NaN}')
    with pytest.raises(DataError, match="NaN is not valid JSON"):
        files.read_json(tmp_path / "n.json")
    (tmp_path / "b.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match="not a readable JSON"):
        files.read_json(tmp_path / "b.json")
