"""The library's INFO lines are visible in a plain script and can be silenced with the logging module."""

import subprocess
import sys

_SCRIPT = """
import logging, sys
{setup}
from lightning_precision._logging import info_rank_zero
info_rank_zero("contract-line")
"""


def _stderr(setup: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(setup=setup)], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stderr


def test_info_line_visible_in_a_plain_script():
    assert "contract-line" in _stderr("")


def test_info_line_silenced_by_logger_level():
    setup = "import lightning_precision; logging.getLogger('lightning_precision').setLevel(logging.WARNING)"
    assert "contract-line" not in _stderr(setup)


def test_info_line_goes_through_an_application_root_handler_once():
    err = _stderr("logging.basicConfig(level=logging.INFO, format='ROOT %(message)s')")
    assert err.count("contract-line") == 1
    assert "ROOT contract-line" in err
