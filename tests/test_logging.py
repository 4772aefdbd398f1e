"""The library's INFO lines are visible in a plain script and can be silenced; warnings point at the user's code."""

import subprocess
import sys
import warnings
from pathlib import Path

from lightning_precision import HalfPrecisionForAudio, PrecisionWarning, resolve_trainer_cfg
from tests.helpers import RecordingModule, fit

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


def test_a_config_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_trainer_cfg({"precision": "bf16-true"}, model={}, optimizer="torch.optim.AdamW")
    (warning,) = [w for w in caught if issubclass(w.category, PrecisionWarning)]
    assert warning.filename == __file__


def test_a_fit_time_warning_points_at_the_users_fit_call():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(RecordingModule(), plugins=[HalfPrecisionForAudio("bf16-true")])
    ours = [w for w in caught if issubclass(w.category, PrecisionWarning)]
    assert ours and {w.filename for w in ours} <= {__file__, str(Path(__file__).parent / "helpers.py")}


def test_a_warning_raised_while_a_config_tool_instantiates_points_past_the_tool():
    """LightningCLI (jsonargparse) and Hydra build the library's classes from YAML: the warning must not point at
    their files but at the user's code that called them."""
    import functools
    import os

    import jsonargparse

    from lightning_precision._logging import warn_once

    tool_file = os.path.join(os.path.dirname(jsonargparse.__file__), "_instantiate_for_test.py")
    namespace: dict = {}
    exec(compile("def instantiate(build):\n    build()\n", tool_file, "exec"), namespace)  # a frame in the tool
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace["instantiate"](functools.partial(warn_once, "test-config-tool-frame", "built from YAML"))
    assert [w.filename for w in caught] == [__file__]
