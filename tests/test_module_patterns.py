"""PEFT module rules without a client's regex ever running: the restricted matcher agrees with
`re.fullmatch` (run here, on trusted patterns, as the oracle) on every BERT module name, refuses what
it does not support, and stays linear on patterns that make a backtracking engine explode."""

from __future__ import annotations

import re
import time

import pytest

from switchboard.adapter_store.formats.module_patterns import compile_pattern, module_matcher
from switchboard.server.core.adapter import AdapterValidationError

MODULES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"]
NAMES = [f"{prefix}encoder.layer.{i}.{m}" for prefix in ("", "bert.", "base_model.model.bert.")
         for i in (0, 5, 11) for m in MODULES]

SUPPORTED = [
    r"output\.dense", r".*output\.dense", r".*\.output\.dense$", r"^.*\.(key|value|output\.dense)$",
    r".*encoder\.layer\.\d+\.output\.dense".replace(r"\d+", ".*"), r".*(intermediate|output)\.dense",
    r"encoder\.layer\.0\.output\.dense|encoder\.layer\.5\.output\.dense", r".*layer\.1.\..*", r".*",
    r".*\.attention\.self\.(query|key|value)", "output.dense", "key",
]


@pytest.mark.parametrize("pattern", SUPPORTED)
def test_the_matcher_agrees_with_re_fullmatch(pattern):
    match = compile_pattern(pattern)
    for name in NAMES:
        assert match(name) == (re.fullmatch(pattern, name) is not None), (pattern, name)


def test_lists_follow_peft_suffix_rule():
    match = module_matcher(["output.dense", "key"], "feedforward_modules")
    assert match("encoder.layer.1.output.dense") and match("encoder.layer.1.attention.output.dense")
    assert match("encoder.layer.1.attention.self.key") and match("key")
    assert not match("encoder.layer.1.attention.self.monkey")  # a suffix after a '.', as PEFT has it
    assert not module_matcher(None, "x")("output.dense")


@pytest.mark.parametrize("pattern", [r"(a+)+b", r"(a*)*b", r"a{1,100}", r"[abc]", r"\d+", r"((a|b))", r"a?",
                                     r"(a|b)*", r"*a", "x" * 300, r"a|(b", r"a)b(", r"a$b", r"a^b"])
def test_unsupported_patterns_are_refused_with_a_hint(pattern):
    with pytest.raises(AdapterValidationError, match="list"):
        compile_pattern(pattern)
    with pytest.raises(AdapterValidationError):
        module_matcher([pattern] * 100, "feedforward_modules")


def test_star_heavy_patterns_stay_linear():
    pattern = ".*" * 60 + "x"  # a backtracking engine tries ~name**60 paths before failing
    match = compile_pattern(pattern)
    name = "a" * 200
    start = time.perf_counter()
    assert not match(name)
    assert time.perf_counter() - start < 1.0
    assert compile_pattern(".*" * 60 + "a")(name)


def test_bad_list_types_are_refused():
    for rule in ({"a": 1}, [1, 2], 5):
        with pytest.raises(AdapterValidationError, match="string or a list"):
            module_matcher(rule, "feedforward_modules")
