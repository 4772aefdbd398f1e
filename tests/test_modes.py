"""Precision strings and dtype spellings."""

import re
from typing import get_args, get_type_hints

import pytest
import torch

from lightning_precision import CheckedMixedPrecision, FlashPrecision, HalfPrecisionForAudio
from lightning_precision.dtypes import parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.modes import LIGHTNING_ONLY_PRECISIONS, MODES, VALID_PRECISIONS, get_mode, spellings


@pytest.mark.parametrize(
    ("spelling", "name", "family"),
    [
        ("bf16-mixed", "bf16-mixed", "lightning"),
        ("bf16", "bf16-mixed", "lightning"),
        ("16", "16-mixed", "lightning"),
        (16, "16-mixed", "lightning"),
        ("32", "32-true", "lightning"),
        ("64-true", "64-true", "lightning"),
        ("bf16-true", "bf16-true", "true"),
        ("fp16-true", "16-true", "true"),
        ("16-true", "16-true", "true"),
        ("bf16-flash", "bf16-flash", "flash"),
        ("fp16-flash", "fp16-flash", "flash"),
    ],
)
def test_known_precisions(spelling, name, family):
    mode = get_mode(spelling)
    assert (mode.name, mode.family) == (name, family)


@pytest.mark.parametrize(("alias", "target"), [("bf16-automodel", "bf16-flash"), ("fp16-automodel", "fp16-flash")])
def test_deprecated_aliases_warn(alias, target):
    with pytest.warns(FutureWarning, match=target):
        assert get_mode(alias).name == target


@pytest.mark.parametrize("bad", ["bf16-fast", "fp8", "", None, 8])
def test_unknown_precision_names_value_and_choices(bad):
    with pytest.raises(PrecisionConfigError) as err:
        get_mode(bad, what="trainer.precision")
    assert repr(bad) in str(err.value) and "bf16-mixed" in str(err.value) and "bf16-flash" in str(err.value)


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [("BF16-TRUE", "bf16-true"), ("bf16-mixed ", "bf16-mixed"), ("BF16-MIXED", "bf16-mixed"), (" 32", "32")],
)
def test_a_known_precision_in_another_case_or_with_spaces_is_refused_naming_the_spelling(spelling, canonical):
    # Lightning and the plugins compare precision strings exactly: reading one spelling and running another is refused.
    with pytest.raises(PrecisionConfigError, match=f"{spelling!r}.*write {canonical!r}"):
        get_mode(spelling, what="trainer.precision")


@pytest.mark.parametrize("name", sorted(MODES))
def test_half_modes_compute_in_half_and_true_modes_store_in_half(name):
    mode = MODES[name]
    if mode.family in ("true", "flash"):
        assert mode.storage_dtype == mode.compute_dtype == mode.half_dtype
        assert mode.casts_inputs and not mode.autocast
    elif mode.autocast:
        assert mode.storage_dtype is None and mode.half_dtype is not None
    else:
        assert mode.half_dtype is None


@pytest.mark.parametrize(
    ("spelling", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("torch.float32", torch.float32),
        (torch.float64, torch.float64),
        (32, torch.float32),
    ],
)
def test_parse_dtype_spellings(spelling, dtype):
    assert parse_dtype(spelling) is dtype


@pytest.mark.parametrize("unset", [None, "auto", "AUTO"])
def test_parse_dtype_unset(unset):
    assert parse_dtype(unset) is None


@pytest.mark.parametrize("bad", ["bf17", "int8", torch.int32, True, 3.5])
def test_parse_dtype_rejects_non_dtypes(bad):
    with pytest.raises(PrecisionConfigError, match="model.torch_dtype"):
        parse_dtype(bad, what="model.torch_dtype")


# -- every precision string a message lists comes from the table -------------------------------------------------------

_QUOTED_PRECISION = re.compile(r"'((?:bf16|fp16|16|32|64)-[a-z]+|transformer-engine[a-z0-9-]*)'")


def _listed(error: Exception) -> list[str]:
    """The quoted precision strings an error message lists, after the value it refuses."""
    return _QUOTED_PRECISION.findall(str(error).split("is not", 1)[-1])


@pytest.mark.parametrize(
    ("build", "family"),
    [
        (lambda: HalfPrecisionForAudio("bf16-fast"), "true"),
        (lambda: FlashPrecision("bf16-fast"), "flash"),
        (lambda: CheckedMixedPrecision("bf16-fast"), None),
        (lambda: get_mode("bf16-fast"), None),
    ],
    ids=["true", "flash", "mixed", "get_mode"],
)
def test_every_precision_an_error_lists_comes_from_modes(build, family):
    with pytest.raises(PrecisionConfigError) as raised:
        build()
    listed = _listed(raised.value)
    assert listed, raised.value
    assert set(listed) <= set(VALID_PRECISIONS) | set(LIGHTNING_ONLY_PRECISIONS)
    if family is not None:
        assert set(listed) <= set(spellings(family))


@pytest.mark.parametrize(
    ("plugin", "family"), [(HalfPrecisionForAudio, "true"), (FlashPrecision, "flash")], ids=["true", "flash"]
)
def test_plugin_literal_is_derived_from_modes(plugin, family):
    hints = get_type_hints(plugin.__init__)
    assert get_args(hints["precision"]) == spellings(family)


def test_mixed_plugin_literal_lists_the_autocast_modes():
    hints = get_type_hints(CheckedMixedPrecision.__init__)
    assert set(get_args(hints["precision"])) == {name for name, mode in MODES.items() if mode.autocast}
