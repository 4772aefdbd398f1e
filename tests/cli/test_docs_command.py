"""lightning-precision docs [TOPIC]: the guide's sections from the installed package, and messages that cite them."""

import re
from pathlib import Path

import pytest
import torch

import lightning_precision
from lightning_precision.catalogue import classify_optimizer
from lightning_precision.cli import docs
from lightning_precision.pairing import judge
from tests.cli.helpers import assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"lightning-precision docs ([a-z0-9-]+)")


@pytest.mark.parametrize("topic", list(docs.TOPICS))
def test_each_topic_prints_its_heading_first(capsys, topic):
    code, out, _ = run(capsys, "docs", topic)
    assert code == 0
    assert out.splitlines()[0].lstrip("#").strip() == docs.TOPICS[topic][1]


def test_a_section_stops_at_the_next_heading_of_its_level(capsys):
    _, out, _ = run(capsys, "docs", "trap")
    assert "## Safe recipes and their memory" not in out  # the next ## section of the guide
    assert "### Measured on the built-in task" in out  # its own subsection is part of it


def test_a_hash_comment_in_a_code_block_is_not_a_heading(capsys):
    _, out, _ = run(capsys, "docs", "accumulation")
    assert "# The same buffers in a hand-written loop" in out
    assert "### What it changed, measured" in out  # the section went on past the comment


def test_no_topic_lists_the_topics(capsys):
    code, out, _ = run(capsys, "docs")
    assert code == 0
    assert all(topic in out for topic in docs.TOPICS)


def test_unknown_topic_exits_2_naming_it_and_the_choices(capsys):
    code, _, err = run(capsys, "docs", "nope")
    assert code == 2
    assert_one_line_error(err)
    assert "'nope'" in err and all(topic in err for topic in docs.TOPICS)


def test_every_topic_the_package_cites_exists():
    sources = "\n".join(p.read_text() for p in Path(lightning_precision.__file__).parent.rglob("*.py"))
    cited = set(CITATION.findall(sources))
    assert cited and cited <= set(docs.TOPICS)


def test_the_trap_warning_cites_the_command_not_a_path():
    message = judge(torch.bfloat16, classify_optimizer("torch.optim.AdamW")).message
    assert "lightning-precision docs trap" in message and "docs/" not in message


def test_a_source_checkout_reads_docs_itself():
    assert docs.docs_dir() == ROOT / "docs"


def test_an_installed_package_reads_its_packaged_docs(monkeypatch, tmp_path):
    packaged = tmp_path / "lightning_precision" / "_docs"
    packaged.mkdir(parents=True)
    (packaged / "precision-guide.md").write_text("# Guide\n\n## Six dtypes, not one\n\npackaged copy\n")
    monkeypatch.setattr(lightning_precision, "__file__", str(tmp_path / "lightning_precision" / "__init__.py"))
    assert docs.docs_dir() == packaged
    assert "packaged copy" in docs.section("dtypes")


def test_missing_docs_exit_2_saying_where_they_were_looked_for(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(lightning_precision, "__file__", str(tmp_path / "lightning_precision" / "__init__.py"))
    code, _, err = run(capsys, "docs", "trap")
    assert code == 2
    assert_one_line_error(err)
    assert "_docs" in err and "precision-guide.md" in err
