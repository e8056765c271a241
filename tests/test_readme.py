"""The README's example must run as printed, and print what the README says it prints."""

import json
import re
from pathlib import Path

from offramp.cli import main

README = Path(__file__).parents[1] / "README.md"


def test_readme_example_prints_what_the_readme_shows(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    shown = [line[2:] for line in code.splitlines() if line.startswith("# exits")]
    assert len(shown) == 1, "the example's last line shows its output as a comment"
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == shown[0]


def test_make_demo_prints_what_the_readme_shows(tmp_path, capsys):
    """`make demo` with its defaults: every seeded figure the README shows is the one printed
    (timings aside), and early exit is faster than the plain backbone at batch 256."""
    blocks = re.findall(r"```\n(exit  accuracy.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "README shows the demo's output once"
    js = tmp_path / "demo.json"
    assert main(["demo", "--quiet", "--json", str(js)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:5]) for line in out if re.match(r"\s+\d+\s+0\.", line)}
    for line in blocks[0].strip().splitlines():
        if re.match(r"\s+\d+\s+0\.", line):  # an exit's row: all but its measured path time
            assert tuple(line.split()[:5]) in rows, line
        elif not line.startswith("wall-clock"):  # timings move with the machine
            assert line in out, line
    r = json.loads(js.read_text())
    assert r["mode"] == "script" and r["config"]["size"] == 16
    assert r["speedup_batch256"] >= 1.5  # 5.8-6.5 measured; the floor


def test_readme_check_network_example_runs_and_every_guarantee_holds(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    code = next(b for b in blocks if "check_network(" in b)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 9 and all(line.startswith("ok") for line in lines), lines
    assert any("runtime = simulation (script)" in line for line in lines)
