"""Progress bars: tqdm's in-place bar on a terminal, one plain line per bar elsewhere."""

from __future__ import annotations

import io
import re
import sys

from offramp._progress import progress


def test_off_a_terminal_every_bar_is_one_line_at_its_end(capsys):
    """Under pytest stderr is not a terminal, as in `make demo > log 2>&1`: a log gets one
    line per epoch, not tqdm's carriage-return refreshes."""
    for epoch in range(3):
        items = progress(range(17), total=17, desc=f"epoch {epoch + 1}/3", unit="batches")
        assert list(items) == list(range(17))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 3, lines
    for epoch, line in enumerate(lines):
        assert re.fullmatch(rf"epoch {epoch + 1}/3: 17/17 batches, \d+\.\d s", line), line


def test_on_a_terminal_the_bar_updates_in_place(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert list(progress(range(5), total=5, desc="epoch 1/1")) == list(range(5))
    assert "\r" in sys.stderr.getvalue() and "epoch 1/1" in sys.stderr.getvalue()


def test_disabled_prints_nothing(capsys):
    assert list(progress(range(3), enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
