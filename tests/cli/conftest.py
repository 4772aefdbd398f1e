"""Fixtures of the command-line tests."""

import pytest


@pytest.fixture
def task():
    return pytest.importorskip("lightning_precision.demos")
