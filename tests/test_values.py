import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_precision.errors import PrecisionConfigError
from lightning_precision.values import parse_bool, parse_dtype_choice, parse_number


@pytest.mark.parametrize("value", [True, False])
def test_bool_accepts_real_bools(value):
    assert parse_bool(value, what="flag") is value


@pytest.mark.parametrize("value", ["false", "False", "true", 0, 1, None, 1.0])
def test_bool_refuses_non_bools_by_default(value):
    with pytest.raises(PrecisionConfigError, match=f"flag: {value!r}".replace("(", r"\(").replace(".", r"\.")):
        parse_bool(value, what="flag")


@pytest.mark.parametrize("text,expected", [("false", False), (" FALSE ", False), ("no", False), ("True", True)])
def test_bool_reads_spellings_when_allowed(text, expected):
    assert parse_bool(text, what="flag", spellings=True) is expected


def test_bool_refuses_unknown_spelling():
    with pytest.raises(PrecisionConfigError, match="'maybe'.*true"):
        parse_bool("maybe", what="flag", spellings=True)


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=0.0, max_value=1e30))
def test_number_accepts_finite_in_range(x):
    assert parse_number(x, what="lr", low=0.0) == x


@given(st.one_of(st.just(math.inf), st.just(-math.inf), st.just(math.nan), st.booleans(), st.text(max_size=3)))
def test_number_refuses_non_finite_bools_and_text(x):
    with pytest.raises(PrecisionConfigError, match=r"Invalid lr: "):
        parse_number(x, what="lr", low=0.0)


@given(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False))
def test_number_open_bound_refuses_the_bound(x):
    with pytest.raises(PrecisionConfigError, match="> 0.0"):
        parse_number(x, what="eps", low=0.0, low_open=True)


def test_number_refuses_tensor():
    with pytest.raises(PrecisionConfigError, match="Tensor"):
        parse_number(torch.tensor(1.0), what="lr")


def test_number_integer_refuses_float():
    with pytest.raises(PrecisionConfigError, match="an int"):
        parse_number(2.5, what="n", integer=True)


@pytest.mark.parametrize("value", ["bf16", "bfloat16", "torch.bfloat16", torch.bfloat16])
def test_dtype_choice_reads_spellings(value):
    assert parse_dtype_choice(value, what="d", choices=(torch.bfloat16, torch.float32)) is torch.bfloat16


@pytest.mark.parametrize("value", ["fp64", torch.int8, "fp8", 3])
def test_dtype_choice_refuses_outside_choices(value):
    with pytest.raises(PrecisionConfigError, match="expected one of torch.bfloat16, torch.float32"):
        parse_dtype_choice(value, what="d", choices=(torch.bfloat16, torch.float32))
