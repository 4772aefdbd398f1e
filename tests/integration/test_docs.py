"""Every code block in README.md and docs/*.md runs, so the docs cannot drift from the code.

What runs:

* ```python blocks: executed with ``exec``, each file's blocks in order in one namespace (a later block may use
  names an earlier block of the same file defined). Each block is its own test; selecting one block with ``-k``
  first replays the blocks before it.
* ```yaml blocks: parsed. A block whose top level has a ``trainer`` key is a trainer config: its ``trainer``,
  ``model`` and ``optimizer`` sections go through :func:`lightning_precision.resolve_trainer_cfg`. Any other YAML
  block must be marked as a fragment (see below), so a config cannot silently go unchecked.
* ```bash and other blocks are not executed.

Directives: an HTML comment on the line(s) right before a block, e.g. ``<!-- docs-test: skip (needs CUDA) -->``.

* ``skip (<reason>)``: do not run the block; the test is skipped with that reason. Keep these rare and honest.
* ``yaml-fragment``: a YAML block that is not a whole trainer config; only checked to parse.
* ``file=<name>``: also write the block's text to ``<name>`` in the file's working directory, for later blocks
  (e.g. ``OmegaConf.load("config.yaml")``).
* ``raises <ExceptionName>``: the block must raise an exception of that class name (for a YAML trainer config:
  ``resolve_trainer_cfg`` must raise it). For examples of what the library refuses.

Directives combine with commas: ``<!-- docs-test: file=config.yaml, raises PrecisionPairingError -->``.

Fixtures the runner provides: each doc file runs in its own fresh temporary working directory, with
``torch.set_num_threads(1)`` (the tiny examples run far faster on one thread on a loaded machine) and the library's
once-per-cause warning registry reset before each file. Warnings raised by a block are recorded, not shown. A block
must finish within ``MAX_BLOCK_SECONDS``: examples train a few steps (``max_steps=2``), not a real run.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import lightning_precision
from lightning_precision import resolve_trainer_cfg
from lightning_precision._logging import reset_reported

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_SKIPS = 4  # skips must stay rare: raise this only with a reason that holds
MAX_BLOCK_SECONDS = 60.0  # doc examples train a few steps; each takes ~1 s on a loaded 2-core CPU

_FENCE = re.compile(r"^```(\w*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None
    fragment: bool = False
    file: str | None = None
    raises: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}-{self.lang}"


def _parse_directives(text: str, block: Block) -> None:
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if m := re.fullmatch(r"skip\s*\((.+)\)", part):
            block.skip = m.group(1).strip()
        elif part == "yaml-fragment":
            block.fragment = True
        elif m := re.fullmatch(r"file=(\S+)", part):
            block.file = m.group(1)
        elif m := re.fullmatch(r"raises\s+(\w+)", part):
            block.raises = m.group(1)
        else:
            raise ValueError(f"{block.path.name}:{block.line}: unknown docs-test directive {part!r}")


def extract_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the directives of the comment right before each."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"{path.name}:{start + 1}: unclosed code fence")
        block = Block(path, start + 1, lang, "\n".join(lines[start + 1 : j]) + "\n")
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        if k >= 0 and (d := _DIRECTIVE.match(lines[k].strip())):
            _parse_directives(d.group(1), block)
        blocks.append(block)
        i = j + 1
    return blocks


ALL_BLOCKS = [b for p in DOC_FILES for b in extract_blocks(p)]
CHECKED = [b for b in ALL_BLOCKS if b.lang in ("python", "yaml")]


@dataclass
class _FileState:
    workdir: Path
    namespace: dict[str, Any] = field(default_factory=dict)
    done: int = 0  # blocks of this file already run (index into the file's checked blocks)


_STATES: dict[Path, _FileState] = {}


def _run_yaml(block: Block) -> None:
    data = yaml.safe_load(block.code)
    if block.fragment:
        return
    assert isinstance(data, dict) and "trainer" in data, (
        f"{block.id}: a YAML block must be a trainer config (top-level 'trainer' key) or be marked "
        "<!-- docs-test: yaml-fragment -->"
    )
    cfg = OmegaConf.create(data)
    resolve_trainer_cfg(cfg.trainer, model=cfg.get("model"), optimizer=cfg.get("optimizer"))


def _run(block: Block, state: _FileState) -> None:
    if block.file:
        (state.workdir / block.file).write_text(block.code)
    if block.skip:
        return
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            if block.lang == "yaml":
                _run_yaml(block)
            else:
                exec(compile(block.code, block.id, "exec"), state.namespace)  # noqa: S102 - running the docs is the point
    except Exception as err:
        if block.raises and type(err).__name__ == block.raises:
            return
        raise
    if block.raises:
        pytest.fail(f"{block.id}: expected {block.raises}, nothing was raised")


@pytest.mark.parametrize("block", CHECKED, ids=[b.id for b in CHECKED])
def test_doc_block(block: Block, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    same_file = [b for b in CHECKED if b.path == block.path]
    index = same_file.index(block)
    state = _STATES.get(block.path)
    if state is None or state.done > index:  # first block of the file seen, or a re-run: start the file afresh
        state = _STATES[block.path] = _FileState(tmp_path_factory.mktemp(block.path.stem.replace(".", "_")))
        reset_reported()
    monkeypatch.chdir(state.workdir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for earlier in same_file[state.done : index]:  # replay, when blocks were selected with -k
            _run(earlier, state)
        state.done = index + 1
        if block.skip:
            if block.file:
                _run(block, state)
            pytest.skip(f"{block.id}: {block.skip}")
        start = time.perf_counter()
        _run(block, state)
        seconds = time.perf_counter() - start
        assert seconds < MAX_BLOCK_SECONDS, f"{block.id} took {seconds:.0f} s: keep doc examples to a few steps"
    finally:
        torch.set_num_threads(threads)


def test_docs_have_blocks_and_few_skips() -> None:
    paths = {b.path for b in CHECKED if b.lang == "python"}
    assert {ROOT / "README.md", ROOT / "docs" / "precision-guide.md", ROOT / "docs" / "recipes.md"} <= paths
    skips = [b.id for b in CHECKED if b.skip]
    assert len(skips) <= MAX_SKIPS, f"too many skipped doc blocks: {skips}"


def _documented_names() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    return set(re.findall(r"^#{2,4} `(?:[\w.]+\.)?(\w+)", text, flags=re.MULTILINE))


def test_every_top_level_export_has_an_api_entry() -> None:
    missing = sorted(set(lightning_precision.__all__) - _documented_names())
    assert not missing, f"docs/api.md has no entry (a '### `Name`' heading) for: {missing}"


@pytest.mark.parametrize("subpackage", ["callbacks", "fabric", "optim", "plugins", "strategies"])
def test_every_subpackage_export_has_an_api_entry(subpackage: str) -> None:
    module = __import__(f"lightning_precision.{subpackage}", fromlist=["__all__"])
    missing = sorted(set(module.__all__) - _documented_names())
    assert not missing, f"docs/api.md has no entry for lightning_precision.{subpackage}: {missing}"


def test_runner_reads_directives(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "<!-- docs-test: skip (needs CUDA) -->\n```python\nraise SystemExit\n```\n\n"
        "<!-- docs-test: file=c.yaml, raises PrecisionPairingError -->\n\n```yaml\na: 1\n```\n```bash\nls\n```\n"
    )
    blocks = extract_blocks(doc)
    assert [(b.lang, b.skip, b.file, b.raises) for b in blocks] == [
        ("python", "needs CUDA", None, None),
        ("yaml", None, "c.yaml", "PrecisionPairingError"),
        ("bash", None, None, None),
    ]
