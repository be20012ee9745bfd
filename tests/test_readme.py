"""The README's quick start runs, and ends with the error it shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_raises_the_error_it_shows():
    text = README.read_text()
    code = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    shown = re.search(r"# IndexError: (.*)", code).group(1)
    with pytest.raises(IndexError) as raised:
        exec(compile(code, str(README), "exec"), {})
    assert str(raised.value) == shown
