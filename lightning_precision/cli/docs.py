"""``lightning-precision docs [TOPIC]``: the section of the guide a warning or error cites, from the installed package.

Messages cite ``lightning-precision docs <topic>`` rather than a ``docs/...`` path, which is not there once the
package is installed. The markdown files ship inside the wheel as ``lightning_precision/_docs/`` (``pyproject.toml``
maps that package to ``docs/``, so there is one copy of each file); a source checkout or an editable install reads
``docs/`` itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning_precision
from lightning_precision.cli.yaml_loading import ConfigInputError

# topic -> (file under docs/, heading text without the leading #s). Headings, not line numbers: the docs move.
TOPICS: dict[str, tuple[str, str]] = {
    "dtypes": ("precision-guide.md", "Six dtypes, not one"),
    "trap": ("precision-guide.md", "Why torch AdamW on bf16 parameters plateaus"),
    "recipes": ("precision-guide.md", "Safe recipes and their memory"),
    "second-moment": (
        "precision-guide.md",
        "CompensatedAdamW at 10 B/param: a stochastically rounded second moment (the default)",
    ),
    "accumulation": ("precision-guide.md", "Gradient accumulation: the dtype of the micro-batch sum"),
    "bf16-state": ("precision-guide.md", "When bf16 optimizer state is acceptable"),
    "monitor": ("precision-guide.md", "Seeing the problem in a run"),
    "memory": ("api.md", "Memory (`lightning_precision.memory`)"),
}


def docs_dir() -> Path:
    """Where the markdown files are: the wheel's ``lightning_precision/_docs``, else a source checkout's ``docs/``."""
    package = Path(lightning_precision.__file__).resolve().parent
    for candidate in (package / "_docs", package.parent / "docs"):
        if (candidate / "precision-guide.md").is_file():
            return candidate
    raise ConfigInputError(
        f"the guide is not installed: neither {package / '_docs'} nor {package.parent / 'docs'} holds "
        "precision-guide.md. Reinstall lightning_precision from a wheel or a source checkout."
    )


def section(topic: str) -> str:
    """The markdown of one topic: its heading and everything up to the next heading of the same or a higher level.

    Raises:
        ConfigInputError: If the topic is unknown (the message lists the topics), or its heading is gone from the file.
    """
    if topic not in TOPICS:
        raise ConfigInputError(f"unknown docs topic {topic!r}. Choose one of: {', '.join(TOPICS)}.")
    name, heading = TOPICS[topic]
    lines = (docs_dir() / name).read_text(encoding="utf-8").splitlines()
    start, level = _find_heading(lines, heading)
    if start is None:
        raise ConfigInputError(f"docs topic {topic!r}: heading {heading!r} is not in {name} any more.")
    end, fenced = len(lines), False
    for i in range(start + 1, len(lines)):
        fenced ^= lines[i].lstrip().startswith("```")  # a '#' inside a code block is a comment, not a heading
        if not fenced and _level(lines[i]) and _level(lines[i]) <= level:
            end = i
            break
    return "\n".join(lines[start:end]).rstrip() + "\n"


def _find_heading(lines: list[str], heading: str) -> tuple[int | None, int]:
    fenced = False
    for i, line in enumerate(lines):
        fenced ^= line.lstrip().startswith("```")
        level = _level(line)
        if not fenced and level and line[level:].strip() == heading:
            return i, level
    return None, 0


def _level(line: str) -> int:
    """The heading level of a markdown line (0: not a heading)."""
    hashes = len(line) - len(line.lstrip("#"))
    return hashes if hashes and line[hashes : hashes + 1] == " " else 0


def topics_text() -> str:
    """The topics, one a line, with the heading each prints."""
    width = max(map(len, TOPICS))
    lines = ["lightning-precision docs TOPIC prints one section of the guide. Topics:"]
    lines += [f"  {topic.ljust(width)}  {heading} ({name})" for topic, (name, heading) in TOPICS.items()]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``docs`` subcommand."""
    parser = sub.add_parser("docs", help="print the section of the guide that a warning or error cites")
    parser.add_argument("topic", nargs="?", help=f"one of: {', '.join(TOPICS)} (none: list them)")


def run(args: argparse.Namespace) -> int:
    """Print the topic's section, or the topics."""
    print(section(args.topic) if args.topic else topics_text(), end="" if args.topic else "\n")
    return 0
