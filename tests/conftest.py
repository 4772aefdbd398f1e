import pytest

from lightning_precision.pairing import reset_reported


@pytest.fixture(autouse=True)
def _fresh_warning_registry():
    """Every test sees warnings as a fresh process would."""
    reset_reported()
    yield
    reset_reported()
