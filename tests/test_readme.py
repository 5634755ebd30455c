"""The README's API tour runs as written (its Hugging Face claim, a packed batch with its 4D additive mask gives every
document the logits it has alone, is tested in tests/test_pack.py)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(title: str) -> list[str]:
    """The ```python blocks of the README section whose heading is ``title``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_api_tour_code_runs(tiny_llama):  # the shared tiny random Llama, a fixture of conftest.py
    blocks = section_code("API tour")
    assert len(blocks) == 5
    torch.manual_seed(0)
    scope = {
        "seqs": [torch.randint(0, 256, (n,)).tolist() for n in (700, 1500, 300, 2500)],
        "L": 256,
        "q": torch.randn(3, 4, 2048, 8),
        "k": torch.randn(3, 2, 2048, 8),
        "v": torch.randn(3, 2, 2048, 8),
        "model": tiny_llama,
    }
    with torch.no_grad():
        for block in blocks:
            exec(compile(block, str(README), "exec"), scope)  # our own README, not user input
    assert scope["packed"].input_ids.shape == (3, 2048)
    assert scope["logits"].shape == (3, 2048, 300)
    assert scope["out"].shape == (3, 4, 2048, 8)


def test_more_mask_primitives_code_runs():
    blocks = section_code("More mask primitives")
    assert len(blocks) == 4
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)  # our own README, not user input
