"""Designed experiments: full factorial designs and 2-level fractional factorials with their aliasing.

Factors are named; in a 2-level design they also get letters A, B, C, ... in the order given, and levels are
coded -1 (low, the first level given) and +1 (high). A fractional design 2^(k-p) takes p generators such as
"D=ABC" (letters) or "top_k=batch*input_len" (names): the k - p base factors form a full 2^(k-p) design in
standard (Yates) order (A alternates every run, B every 2 runs, ...) and each generated column is the product
of its sources' coded columns.

Aliasing: each generator X = W gives the word XW of the defining relation I = XW; the defining relation is
every product of those words (products cancel repeated letters: ABD x ACE = BCDE). An effect's aliases are its
products with the words. The resolution is the length of the shortest word: III confounds main effects with
2-factor interactions, IV confounds 2-factor interactions with each other, V leaves both clear.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LETTERS = string.ascii_uppercase


@dataclass
class Design:
    """A design: `table` has run (standard order), run_order, each factor's actual level and, for 2-level
    designs, `<factor>_coded` in {-1, +1}. words: the defining relation (letters), empty for a full design."""

    table: Any  # pandas.DataFrame
    factors: dict[str, list[Any]]
    letters: dict[str, str] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)

    @property
    def resolution(self) -> int | None:
        """Shortest word length of the defining relation; None for a full factorial (no aliasing)."""
        return min(len(w) for w in self.words) if self.words else None

    def aliases(self, order: int = 2) -> dict[str, list[str]]:
        """Alias chains of every effect up to `order` factors (letters): {"A": ["BCD"], "AB": ["CD"], ...}."""
        return alias_chains(list(self.letters.values()), self.words, order)


def _word_product(a: str, b: str) -> str:
    """Product of two effect words: letters in one but not both, sorted (A x AB = B)."""
    return "".join(sorted(set(a) ^ set(b)))


def full_factorial(factors: Mapping[str, Sequence[Any]], seed: int | None = None) -> Design:
    """Every combination of every level; the last factor varies fastest. seed: randomize run_order."""
    import pandas as pd

    _check_factors(factors)
    names = list(factors)
    combos = list(itertools.product(*(factors[n] for n in names)))
    table = pd.DataFrame(combos, columns=names)
    if all(len(v) == 2 for v in factors.values()):
        for n in names:
            table[f"{n}_coded"] = np.where(table[n] == factors[n][0], -1, 1)
    table.insert(0, "run", np.arange(1, len(table) + 1))
    table.insert(1, "run_order", _order(len(table), seed))
    letters = {n: LETTERS[i] for i, n in enumerate(names)} if len(names) <= 26 else {}
    return Design(table, {n: list(v) for n, v in factors.items()}, letters)


def parse_generator(gen: str, names: Sequence[str]) -> tuple[str, list[str]]:
    """"D=ABC" or "top_k=batch*input_len" -> (target factor name, source factor names)."""
    letters = {LETTERS[i]: n for i, n in enumerate(names)}
    lhs, sep, rhs = gen.replace(" ", "").partition("=")
    if not sep or not lhs or not rhs:
        raise ValueError(f"generator {gen!r}: expected TARGET=SOURCES, e.g. D=ABC or top_k=batch*input_len")

    def name(tok: str) -> str:
        if tok in names:
            return tok
        if tok in letters:
            return letters[tok]
        raise ValueError(f"generator {gen!r}: {tok!r} is neither a factor ({', '.join(names)}) nor a letter "
                         f"({', '.join(letters)})")

    target = name(lhs)
    if "*" in rhs or rhs in names:
        sources = [name(t) for t in rhs.split("*")]
    else:
        sources = [name(ch) for ch in rhs]
    if target in sources or len(set(sources)) != len(sources):
        raise ValueError(f"generator {gen!r}: sources must be distinct and differ from the target")
    return target, sources


def fractional_factorial(factors: Mapping[str, Sequence[Any]], generators: Sequence[str],
                         seed: int | None = None) -> Design:
    """A 2^(k-p) design: every factor has exactly 2 levels, p = len(generators)."""
    import pandas as pd

    _check_factors(factors)
    names = list(factors)
    bad = [n for n in names if len(factors[n]) != 2]
    if bad:
        raise ValueError(f"a fractional factorial needs 2 levels per factor; {', '.join(bad)} have "
                         f"{', '.join(str(len(factors[n])) for n in bad)}")
    if len(names) > 26:
        raise ValueError(f"at most 26 factors (letters A-Z), got {len(names)}")
    gens = [parse_generator(g, names) for g in generators]
    targets = [t for t, _ in gens]
    if len(set(targets)) != len(targets):
        raise ValueError(f"each factor may be generated once; targets {targets}")
    base = [n for n in names if n not in targets]
    for t, src in gens:
        if any(s in targets for s in src):
            raise ValueError(f"generator for {t}: sources must be base factors ({', '.join(base)}), got {src}")
    n_runs = 2 ** len(base)
    coded: dict[str, np.ndarray] = {}
    for i, n in enumerate(base):  # Yates order: factor i alternates every 2^i runs
        coded[n] = np.where((np.arange(n_runs) >> i) & 1, 1, -1)
    for t, src in gens:
        coded[t] = np.prod([coded[s] for s in src], axis=0)
    letters = {n: LETTERS[i] for i, n in enumerate(names)}
    table = pd.DataFrame({n: np.where(coded[n] < 0, factors[n][0], factors[n][1]) for n in names})
    for n in names:
        table[f"{n}_coded"] = coded[n]
    table.insert(0, "run", np.arange(1, n_runs + 1))
    table.insert(1, "run_order", _order(n_runs, seed))
    gen_words = ["".join(sorted(letters[t] + "".join(letters[s] for s in src))) for t, src in gens]
    return Design(table, {n: list(v) for n, v in factors.items()}, letters, defining_relation(gen_words))


def defining_relation(generator_words: Sequence[str]) -> list[str]:
    """Every product of a non-empty subset of the generator words, shortest first."""
    words: set[str] = set()
    for r in range(1, len(generator_words) + 1):
        for subset in itertools.combinations(generator_words, r):
            w = ""
            for g in subset:
                w = _word_product(w, g)
            if w:
                words.add(w)
    return sorted(words, key=lambda w: (len(w), w))


def alias_chains(letters: Sequence[str], words: Sequence[str], order: int = 2) -> dict[str, list[str]]:
    """For each effect of up to `order` letters: the effects it is confounded with (its products with words)."""
    out: dict[str, list[str]] = {}
    for r in range(1, order + 1):
        for combo in itertools.combinations(sorted(letters), r):
            eff = "".join(combo)
            out[eff] = sorted({_word_product(eff, w) for w in words}, key=lambda w: (len(w), w))
    return out


def _order(n: int, seed: int | None) -> np.ndarray:
    if seed is None:
        return np.arange(1, n + 1)
    return np.random.default_rng(seed).permutation(n) + 1


def _check_factors(factors: Mapping[str, Sequence[Any]]) -> None:
    if not factors:
        raise ValueError("a design needs at least one factor (--factor NAME=LOW,HIGH)")
    for n, levels in factors.items():
        if len(levels) < 2:
            raise ValueError(f"factor {n} needs at least 2 levels, got {list(levels)}")
        if len(set(map(str, levels))) != len(levels):
            raise ValueError(f"factor {n} has repeated levels {list(levels)}")


def parse_factor(item: str) -> tuple[str, list[Any]]:
    """"batch=1,64" -> ("batch", [1, 64]); numbers become int or float, the rest stay strings."""
    name, sep, vals = item.partition("=")
    levels = [v.strip() for v in vals.split(",")]
    if not sep or not name.strip() or not all(levels):
        raise ValueError(f"factor {item!r}: expected NAME=LEVEL1,LEVEL2[,...] (no empty level)")

    def num(v: str) -> Any:
        for t in (int, float):
            try:
                return t(v)
            except ValueError:
                pass
        return v

    return name.strip(), [num(v) for v in levels]
