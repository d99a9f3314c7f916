"""README's library example runs as written, and with a user model in place of the built-in one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hierarchical_linear_gaussian.py"


def library_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1
    return blocks[0].replace("epochs=5", "epochs=1").replace("k=1000", "k=50")


@pytest.mark.parametrize("user_model", [False, True])
def test_the_library_example_runs(user_model, capsys):
    code = library_example()
    if user_model:
        code = code.replace('load_dataset("digits")', 'load_dataset("linear-gaussian")').replace(
            'latent_dim=8, hidden=(64,), guide="iaf", flows=2',
            f'model="{EXAMPLE}:make_model", guide="iaf", flows=2')
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
