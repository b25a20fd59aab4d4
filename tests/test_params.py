"""Hyperparameter parsing, validation and method-name resolution."""

from dataclasses import dataclass
from typing import Literal

import pytest

from bench import params as P
from bench.method import resolve


@dataclass(frozen=True)
class Knobs:
    c: float = P.param(0.4, "radius", low=0.0, high=1.0, high_open=True)
    n: int = P.param(3, "count", low=1)
    mode: Literal["a", "b"] = P.param("a", "mode", choices=("a", "b"))
    flag: bool = P.param(False, "flag")
    layers: tuple[int, ...] = P.param((1, 2), "layers")


def test_split_spec():
    assert P.split_spec("cagrad:c=0.5,rescale=1") == ("cagrad", {"c": "0.5", "rescale": "1"})
    assert P.split_spec("rlar@mid") == ("rlar@mid", {})
    with pytest.raises(P.ParamError, match="key=value"):
        P.split_spec("cagrad:c")


def test_build_coerces_types():
    k = P.build(Knobs, {"c": "0.5", "n": "7", "mode": "b", "flag": "true", "layers": "4/5"}, "m")
    assert (k.c, k.n, k.mode, k.flag, k.layers) == (0.5, 7, "b", True, (4, 5))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"c": "1.0"}, r"c=1.0 is out of range; valid: \[0.0, 1.0\)"),
        ({"c": "-0.1"}, "out of range"),
        ({"n": "0"}, r"n=0 is out of range; valid: \[1, inf\]"),
        ({"mode": "z"}, "not a valid"),
        ({"n": "two"}, "not a valid int"),
        ({"zzz": "1"}, "unknown parameter zzz; valid parameters: c"),
    ],
)
def test_build_rejects_bad_values_naming_owner_param_and_range(overrides, message):
    with pytest.raises(P.ParamError, match=message) as err:
        P.build(Knobs, overrides, "method cagrad")
    assert "method cagrad" in str(err.value)


def test_format_spec_lists_only_non_default_values_sorted():
    assert P.format_spec("x", Knobs()) == "x"
    assert P.format_spec("x", Knobs(n=5, c=0.1)) == "x:c=0.1,n=5"


def test_resolve_default_base_and_canonical_names():
    assert resolve("vanilla").name == "vanilla"
    assert resolve("vanilla:w_cls=2").name == "vanilla:w_cls=2.0"
    assert resolve("vanilla:w_cls=2").params()["vanilla.w_cls"] == 2.0


def test_resolve_unknown_method_lists_valid_names():
    with pytest.raises(Exception, match=r"unknown method 'nope'; valid methods: .*vanilla"):
        resolve("nope")


def test_resolve_rejects_two_bases():
    with pytest.raises(P.ParamError, match="at most one base"):
        resolve("vanilla+st-unet")
