"""Every code block in README.md and docs/*.md runs, so the docs cannot drift from the code.

What runs:

* ```python blocks: each one on its own, as a reader who copies just that block runs it: in a fresh interpreter with
  a fresh namespace, so a block cannot use a name that another block defined (each brings its own imports, model,
  data and trainer). The interpreter is forked from a ``multiprocessing`` forkserver that has imported only
  ``torch``, ``lightning.pytorch``, ``lightning_precision`` and this module: fast (nothing is imported again per
  block), and nothing is inherited from the pytest process (no gloo or OpenMP threads, no torch settings, no warning
  registry). The exception's class name and traceback (with the doc's own file and line numbers) come back over a
  pipe; a block still running after ``MAX_BLOCK_SECONDS`` is killed and fails saying so.
* ```yaml blocks: parsed, in the pytest process. A block whose top level has a ``trainer`` key is a trainer config:
  its ``trainer``, ``model`` and ``optimizer`` sections go through :func:`lightning_precision.resolve_trainer_cfg`.
  Any other YAML block must be marked as a fragment (see below), so a config cannot silently go unchecked.
* ```bash and other blocks are not executed.

Directives: an HTML comment on the line(s) right before a block, e.g. ``<!-- docs-test: skip (needs CUDA) -->``.

* ``skip (<reason>)``: do not run the block; the test is skipped with that reason. Keep these rare and honest.
* ``yaml-fragment``: a YAML block that is not a whole trainer config; only checked to parse.
* ``file=<name>``: also write the block's text to ``<name>`` in the doc file's working directory, for later blocks
  (e.g. ``OmegaConf.load("config.yaml")``). Before a block runs, every ``file=`` block of the same doc up to and
  including it is written there, so a block selected alone with ``-k`` finds its files.
* ``raises <ExceptionName>``: the block must raise an exception of that class name (for a YAML trainer config:
  ``resolve_trainer_cfg`` must raise it). For examples of what the library refuses.
* ``warns <WarningName>``: the block must emit a warning of that class (or of a subclass). For examples that show
  the trap on purpose.

Directives combine with commas: ``<!-- docs-test: file=config.yaml, raises PrecisionPairingError -->``.

Warnings: every warning a block emits is recorded, not shown. A block that emits a
:class:`lightning_precision.errors.PrecisionWarning` fails unless it is marked ``raises ...`` or
``warns PrecisionWarning``: an example the docs offer as a recipe must not trip the library's own warning.

Fixtures the runner provides: each doc file has its own temporary working directory, shared by its blocks (a block
may read what an earlier one wrote only through ``file=``); a Python block runs with ``torch.set_num_threads(1)``
(the tiny examples run far faster on one thread on a loaded machine); the library's once-per-cause warning registry
is fresh for every block. A block must finish within ``MAX_BLOCK_SECONDS``: examples train a few steps
(``max_steps=2``), not a real run.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

import lightning_precision
from lightning_precision import resolve_trainer_cfg
from lightning_precision._logging import reset_reported

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_SKIPS = 4  # skips must stay rare: raise this only with a reason that holds
MAX_BLOCK_SECONDS = 60.0  # doc examples train a few steps; each takes ~1 s on a loaded 2-core CPU
# What the forkserver imports once; every block's interpreter is forked from it. This module is among them, so a
# child has ``_run_in_child`` (and pytest, yaml) without importing them again.
PRELOAD = ["torch", "lightning.pytorch", "lightning_precision", __name__]
TRAP_WARNING = "PrecisionWarning"  # lightning_precision.errors.PrecisionWarning: fails a block not marked for it

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
    warns: str | None = None

    @property
    def id(self) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{name}:{self.line}-{self.lang}"


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
        elif m := re.fullmatch(r"warns\s+(\w+)", part):
            block.warns = m.group(1)
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
class Outcome:
    """What running one block gave: the exception (class name and traceback text) and the warnings it emitted."""

    error: str | None = None
    traceback: str = ""
    warnings: list[tuple[list[str], str]] = field(default_factory=list)  # (category and bases' names, "where: text")


def _warning_record(w: warnings.WarningMessage) -> tuple[list[str], str]:
    return [c.__name__ for c in w.category.__mro__], f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}"


def _error(outcome: Outcome, err: BaseException, *, skip_runner_frame: bool = False) -> None:
    tb = err.__traceback__
    if skip_runner_frame and tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # start the traceback at the block's own line
    outcome.error = type(err).__name__
    outcome.traceback = "".join(traceback.format_exception(type(err), err, tb))


def _run_in_child(conn: Any, source: str, filename: str, workdir: str) -> None:
    """The body of a block's own interpreter (forked from the forkserver): run ``source`` in a fresh namespace and
    send an :class:`Outcome` back. Exits with ``os._exit``: nothing the block started may hold the process open."""
    import torch

    outcome = Outcome()
    try:
        os.chdir(workdir)
        torch.set_num_threads(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = compile(source, filename, "exec")
                exec(code, {"__name__": "__doc_block__"})  # noqa: S102 - running the docs is the point
            except BaseException as err:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are reported too
                _error(outcome, err, skip_runner_frame=True)
        outcome.warnings = [_warning_record(w) for w in caught]
    except BaseException as err:  # noqa: BLE001 - the runner's own failure, reported the same way
        _error(outcome, err)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.send(outcome)
            conn.close()
        finally:
            os._exit(0)


@functools.cache
def _forkserver() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _run_python(block: Block, workdir: Path) -> Outcome:
    """Run one Python block in a fresh interpreter forked from the forkserver, killed after ``MAX_BLOCK_SECONDS``."""
    ctx = _forkserver()
    # Padded so that the traceback names the doc's own lines, which linecache then shows.
    source = "\n" * block.line + block.code
    receiver, sender = ctx.Pipe(duplex=False)
    # Not a daemon: a block may start processes of its own (DataLoader workers). It is joined or killed below.
    child = ctx.Process(target=_run_in_child, args=(sender, source, str(block.path), str(workdir)))
    start = time.perf_counter()
    child.start()
    sender.close()
    try:
        if not receiver.poll(MAX_BLOCK_SECONDS):
            child.kill()
            pytest.fail(
                f"{block.id} was still running after {MAX_BLOCK_SECONDS:.0f} s and was killed: keep doc examples to "
                "a few steps (max_steps=2)",
                pytrace=False,
            )
        try:
            outcome = receiver.recv()
        except EOFError:
            child.join(5)
            pytest.fail(
                f"{block.id}: its interpreter died without a result (exit code {child.exitcode}), "
                f"after {time.perf_counter() - start:.1f} s",
                pytrace=False,
            )
    finally:
        receiver.close()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
    return outcome


def _run_yaml(block: Block) -> Outcome:
    """Parse a YAML block and, for a trainer config, resolve it (in this process: no model is built)."""
    outcome = Outcome()
    data = yaml.safe_load(block.code)
    if block.fragment:
        return outcome
    if not (isinstance(data, dict) and "trainer" in data):
        pytest.fail(
            f"{block.id}: a YAML block must be a trainer config (top-level 'trainer' key) or be marked "
            "<!-- docs-test: yaml-fragment -->",
            pytrace=False,
        )
    reset_reported()  # as fresh as a Python block's interpreter
    cfg = OmegaConf.create(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            resolve_trainer_cfg(cfg.trainer, model=cfg.get("model"), optimizer=cfg.get("optimizer"))
        except Exception as err:  # noqa: BLE001 - judged against the block's directives
            _error(outcome, err)
    outcome.warnings = [_warning_record(w) for w in caught]
    return outcome


def check_outcome(block: Block, outcome: Outcome) -> None:
    """Fail (with the block's traceback) unless ``outcome`` is what the block's directives promise."""
    if block.raises:
        if outcome.error is None:
            pytest.fail(f"{block.id}: expected {block.raises}, nothing was raised", pytrace=False)
        if outcome.error != block.raises:
            pytest.fail(
                f"{block.id}: expected {block.raises}, got {outcome.error}:\n{outcome.traceback}", pytrace=False
            )
    elif outcome.error is not None:
        pytest.fail(f"{block.id} raised {outcome.error}:\n{outcome.traceback}", pytrace=False)
    emitted = outcome.warnings
    if block.warns and not any(block.warns in names for names, _ in emitted):
        seen = "".join(f"\n  {text}" for _, text in emitted) or " none"
        pytest.fail(f"{block.id}: expected a {block.warns}; warnings emitted:{seen}", pytrace=False)
    if not block.raises and block.warns != TRAP_WARNING:
        trap = [text for names, text in emitted if TRAP_WARNING in names]
        if trap:
            pytest.fail(
                f"{block.id} emitted a {TRAP_WARNING} (fix the example, or mark it "
                f"<!-- docs-test: warns {TRAP_WARNING} --> if it shows the trap on purpose):"
                + "".join(f"\n  {text}" for text in trap),
                pytrace=False,
            )


_WORKDIRS: dict[Path, Path] = {}


def _prepare_workdir(block: Block, blocks: list[Block], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The doc file's working directory, with the ``file=`` blocks up to and including ``block`` written there."""
    workdir = _WORKDIRS.get(block.path)
    if workdir is None:
        workdir = _WORKDIRS[block.path] = tmp_path_factory.mktemp(block.path.stem.replace(".", "_"))
    for earlier in blocks[: blocks.index(block) + 1]:
        if earlier.path == block.path and earlier.file:
            (workdir / earlier.file).write_text(earlier.code)
    return workdir


def run_block(block: Block, workdir: Path) -> None:
    """Run one block (Python in its own interpreter, YAML here) in ``workdir`` and check it against its directives."""
    start = time.perf_counter()
    if block.lang == "python":
        outcome = _run_python(block, workdir)
    else:
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            outcome = _run_yaml(block)
        finally:
            os.chdir(cwd)
    check_outcome(block, outcome)
    seconds = time.perf_counter() - start
    assert seconds < MAX_BLOCK_SECONDS, f"{block.id} took {seconds:.0f} s: keep doc examples to a few steps"


@pytest.mark.parametrize("block", CHECKED, ids=[b.id for b in CHECKED])
def test_doc_block(block: Block, tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = _prepare_workdir(block, ALL_BLOCKS, tmp_path_factory)
    if block.skip:
        pytest.skip(f"{block.id}: {block.skip}")
    run_block(block, workdir)


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
        "<!-- docs-test: warns PrecisionWarning -->\n```python\npass\n```\n"
    )
    blocks = extract_blocks(doc)
    assert [(b.lang, b.skip, b.file, b.raises, b.warns) for b in blocks] == [
        ("python", "needs CUDA", None, None, None),
        ("yaml", None, "c.yaml", "PrecisionPairingError", None),
        ("bash", None, None, None, None),
        ("python", None, None, None, "PrecisionWarning"),
    ]


def _doc(tmp_path: Path, text: str) -> list[Block]:
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    return extract_blocks(doc)


def _fails(block: Block, workdir: Path) -> str:
    with pytest.raises(pytest.fail.Exception) as failed:
        run_block(block, workdir)
    return str(failed.value)


def test_runner_runs_each_block_alone(tmp_path: Path) -> None:
    """A block cannot use a name an earlier block defined, nor a module it imported: each has a fresh interpreter."""
    first, second, third = _doc(
        tmp_path,
        "```python\nimport json\nanswer = 42\n```\n\n"
        "```python\nassert answer == 42\n```\n\n"
        "```python\njson.dumps(1)\n```\n",
    )
    run_block(first, tmp_path)
    message = _fails(second, tmp_path)
    assert "doc.md:6-python raised NameError" in message and "name 'answer' is not defined" in message
    assert "assert answer == 42" in message  # the traceback shows the doc's own line
    assert "NameError: name 'json' is not defined" in _fails(third, tmp_path)


def test_runner_checks_warnings_raises_and_files(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    warn = (
        "import warnings\nfrom lightning_precision import PrecisionWarning\n"
        "warnings.warn('the trap', PrecisionWarning)\n"
    )
    blocks = _doc(
        tmp_path,
        f"```python\n{warn}```\n<!-- docs-test: warns PrecisionWarning -->\n```python\n{warn}```\n"
        "<!-- docs-test: warns PrecisionWarning -->\n```python\npass\n```\n"
        "<!-- docs-test: raises KeyError, file=c.py -->\n```python\n{}['x']\n```\n"
        "```python\nassert open('c.py').read() == '{}[' + repr('x') + ']' + chr(10)\n```\n",
    )
    unmarked, marked, silent, raising, reads = blocks
    message = _fails(unmarked, tmp_path)
    assert "emitted a PrecisionWarning" in message and "the trap" in message
    run_block(marked, tmp_path)
    assert "expected a PrecisionWarning; warnings emitted: none" in _fails(silent, tmp_path)
    run_block(raising, tmp_path)
    run_block(reads, _prepare_workdir(reads, blocks, tmp_path_factory))


def test_runner_kills_a_block_that_runs_too_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "MAX_BLOCK_SECONDS", 1.0)
    (block,) = _doc(tmp_path, "```python\nimport time\ntime.sleep(60)\n```\n")
    start = time.perf_counter()
    assert "was still running after 1 s and was killed" in _fails(block, tmp_path)
    assert time.perf_counter() - start < 30
