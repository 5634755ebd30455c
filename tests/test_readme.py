"""Every code block of the README runs as written: each section's ```python blocks are executed verbatim, in order,
in one fresh namespace per section (a section reads as one script). Blocks added later are picked up by themselves.

The README's Hugging Face claim (a packed batch with its 4D additive mask gives every document the logits it has
alone) is tested in tests/test_pack.py.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", flags=re.S | re.M)
# Shell blocks are not run here, each for a stated reason; a new shell block must be added to this list.
SHELL_NOT_RUN = {
    "make demo": "creates a virtual environment and installs packages (CI's `make test` is that very command)",
    "torchrun --nproc-per-node 2 examples/ddp_train.py": "two processes training a model: tests/test_distributed.py",
    "attnmask pack --chat --tokenizer ./tok": "a tokenizer folder: tests/test_chat.py runs it on one it builds",
    "attnmask inspect --chat --tokenizer ./tok": "a tokenizer folder: tests/test_chat.py runs it on one it builds",
}


def sections() -> dict[str, str]:
    """``{heading: text}`` for every ``## `` section of the README."""
    parts = re.split(r"^## (.+)$", README.read_text(encoding="utf-8"), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def blocks(language: str) -> dict[str, list[str]]:
    """The blocks of one fence language per section, in order (sections without any left out)."""
    found = {
        title: [code for lang, code in FENCE.findall(text) if lang == language] for title, text in sections().items()
    }
    return {title: codes for title, codes in found.items() if codes}


def test_every_block_says_its_language():
    languages = {lang for text in sections().values() for lang, _ in FENCE.findall(text)}
    assert languages <= {"python", "bash", "text"}, languages


def test_shell_blocks_not_run_are_listed_with_a_reason():
    shell = [line for codes in blocks("bash").values() for code in codes for line in code.splitlines()]
    for line in shell:
        assert any(line.startswith(command) for command in SHELL_NOT_RUN) or line.startswith(("make ", "python ")), line


@pytest.mark.parametrize("title", sorted(blocks("python")))
def test_python_blocks_run_as_written(title, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files (datasets' save_to_disk) write here
    torch.manual_seed(0)
    scope: dict = {"__name__": "readme"}
    for code in blocks("python")[title]:
        exec(compile(code, f"{README}: {title}", "exec"), scope)  # our own README, not user input
    if title.startswith("Chat fine-tuning"):
        assert scope["stats"].conversations == 100 and scope["stats"].untrained == ()
    if title == "API tour":
        assert scope["packed"].input_ids.shape == (3, 2048)
        assert scope["logits"].shape == (3, 2048, 300)
        assert scope["out"].shape == (3, 4, 2048, 8)
