"""The README's example must run as printed, and print what the README says it prints."""

import re
from pathlib import Path


def test_readme_example_prints_what_the_readme_shows(capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    shown = [line[2:] for line in code.splitlines() if line.startswith("# exits")]
    assert len(shown) == 1, "the example's last line shows its output as a comment"
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == shown[0]
