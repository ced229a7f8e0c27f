"""Executes the Python code blocks of the documentation, so examples stay true."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(path):
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("page", ["docs/api.md", "README.md"])
def test_documentation_examples_run(page, tmp_path, monkeypatch):
  blocks = _blocks(ROOT / page)
  assert blocks, f"{page} has no python examples"
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__docs__"}
  for index, block in enumerate(blocks):
    try:
      exec(compile(block, f"{page}[block {index}]", "exec"), namespace)
    except Exception as err:  # pragma: no cover - the message is the point
      raise AssertionError(f"{page} block {index} failed: {err!r}\n{block}") from err
