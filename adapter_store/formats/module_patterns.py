"""PEFT's `target_modules` / `feedforward_modules` rules, matched without running a client's regex.

PEFT treats a list as module-name suffixes and a string as a regular expression (`re.fullmatch`).
A regex from an uploaded file must never reach a backtracking engine (a nested quantifier against a
long name froze a server for 30 s), and the server runs no client-supplied pattern at all. So a
string is parsed into a tiny language that covers the patterns PEFT users write —

    literal characters, `\\.` and other escaped punctuation, `.` (any character), `.*` (any string),
    one group of alternatives `(a|b|c)` or top-level alternatives `a|b`, and `^` / `$` anchors

— and matched by simulating its automaton: time O(pattern length × name length), no backtracking.
Anything else (`+`, `?`, `{}`, classes, nested groups, `\\d`, …) is refused with a message that
says to save the adapter with a list instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from switchboard.server.core.adapter import AdapterValidationError

MAX_PATTERN_LENGTH = 256
MAX_LIST_ENTRIES = 64
_LITERAL, _ANY, _STAR = 0, 1, 2
_UNSUPPORTED = set("+?{}[]")

Token = tuple[int, str]
Matcher = Callable[[str], bool]


def _refuse(pattern: str, why: str) -> AdapterValidationError:
    return AdapterValidationError(
        f"module pattern {pattern[:80]!r}: {why}; Switchboard accepts lists of module names, or a pattern made "
        "of literals, '.', '.*', one '(a|b)' group and anchors")


def _tokens(text: str, pattern: str) -> list[Token]:
    """One alternative (no '|' or parentheses left) → tokens."""
    out: list[Token] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text) or text[i + 1].isalnum():
                raise _refuse(pattern, "escape sequences other than escaped punctuation are not supported")
            out.append((_LITERAL, text[i + 1]))
            i += 2
            continue
        if c in _UNSUPPORTED or c in "()|":
            raise _refuse(pattern, f"{c!r} is not supported")
        if c == "*":
            if not out or out[-1][0] != _ANY:
                raise _refuse(pattern, "'*' is supported only as '.*'")
            out[-1] = (_STAR, "")
        elif c == ".":
            out.append((_ANY, ""))
        elif c in "^$":
            if not (i == 0 and c == "^") and not (i == len(text) - 1 and c == "$"):
                raise _refuse(pattern, f"{c!r} is supported only as an anchor")
        else:
            out.append((_LITERAL, c))
        i += 1
    return out


def _alternatives(pattern: str) -> list[list[Token]]:
    """prefix(a|b|c)suffix → [prefix a suffix, prefix b suffix, …]; a|b at the top level likewise."""
    opens, closes = pattern.count("("), pattern.count(")")
    if opens > 1 or closes != opens:
        raise _refuse(pattern, "at most one group of alternatives")
    if opens:
        start, end = pattern.index("("), pattern.index(")")
        if end < start:
            raise _refuse(pattern, "unbalanced parentheses")
        prefix, body, suffix = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
        if "|" in prefix or "|" in suffix:
            raise _refuse(pattern, "alternatives outside the group")
        if body.endswith("*") and not body.endswith(".*") or suffix.startswith("*"):
            raise _refuse(pattern, "a quantified group is not supported")
        return [_tokens(prefix + alt + suffix, pattern) for alt in body.split("|")]
    return [_tokens(alt, pattern) for alt in pattern.split("|")]


def _fullmatch(tokens: list[Token], name: str) -> bool:
    """Thompson simulation over token positions: each character advances a set of states."""
    def closure(states: set[int]) -> set[int]:
        out = set(states)
        for s in sorted(states):
            j = s
            while j < len(tokens) and tokens[j][0] == _STAR:  # a star may match nothing
                j += 1
                out.add(j)
        return out

    states = closure({0})
    for ch in name:
        step: set[int] = set()
        for s in states:
            if s == len(tokens):
                continue
            kind, value = tokens[s]
            if kind == _STAR:
                step.add(s)  # consume and stay
            elif kind == _ANY or value == ch:
                step.add(s + 1)
        states = closure(step)
        if not states:
            return False
    return len(tokens) in states


def compile_pattern(pattern: str) -> Matcher:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise _refuse(pattern, f"longer than {MAX_PATTERN_LENGTH} characters")
    alternatives = _alternatives(pattern)
    return lambda name: any(_fullmatch(tokens, name) for tokens in alternatives)


def module_matcher(rule: str | Iterable[str] | None, field: str) -> Matcher:
    """PEFT's rule as a matcher over full module names (e.g. `encoder.layer.3.output.dense`)."""
    if rule is None:
        return lambda name: False
    if isinstance(rule, str):
        return compile_pattern(rule)
    names = list(rule) if isinstance(rule, list | tuple) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise AdapterValidationError(f"{field} must be a string or a list of strings")
    if len(names) > MAX_LIST_ENTRIES or any(len(n) > MAX_PATTERN_LENGTH for n in names):
        raise AdapterValidationError(f"{field}: at most {MAX_LIST_ENTRIES} names of at most "
                                     f"{MAX_PATTERN_LENGTH} characters")
    targets = set(names)
    # PEFT's list rule (peft.tuners.tuners_utils.check_target_module_exists): exact, or a '.'-suffix
    return lambda name: name in targets or any(name.endswith("." + t) for t in targets)


def layer_tensor_key(stacks: Iterable[str], module: str, suffix: str) -> re.Pattern[str]:
    """A checkpoint key `<prefix>.<stack>.<layer>.<module>.<suffix>` of a backbone family (prefix: the
    model class's base, `bert.`, `model.`, …): groups `stack`, `layer`, `module`. `module` and `suffix`
    are our own patterns, never a client's."""
    alternatives = "|".join(re.escape(s) for s in stacks)
    return re.compile(rf"^(?:[A-Za-z_]+\.)?(?P<stack>{alternatives})\.(?P<layer>\d+)\.(?P<module>{module})\.{suffix}$")
