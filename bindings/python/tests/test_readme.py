"""The README's Python example runs as written."""

import re

from conftest import HERE, needs_loss


@needs_loss
def test_readme_example_runs(capsys):
    text = (HERE.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "no python example in README.md"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert "loss " in capsys.readouterr().out
