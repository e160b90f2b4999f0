"""Designs (known fractional factorials and their aliasing) and ANOVA on data with known effects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moelab.lab.doe import defining_relation, fractional_factorial, full_factorial, parse_factor, parse_generator

pytest.importorskip("statsmodels")


def test_full_factorial() -> None:
    d = full_factorial({"batch": [1, 16, 64], "top_k": [2, 8]})
    assert len(d.table) == 6 and d.resolution is None and d.words == []
    assert list(d.table["batch"]) == [1, 1, 16, 16, 64, 64] and list(d.table["top_k"]) == [2, 8] * 3
    two = full_factorial({"a": ["x", "y"], "b": [0, 1]}).table
    assert list(two["a_coded"]) == [-1, -1, 1, 1] and list(two["b_coded"]) == [-1, 1, -1, 1]


def test_half_fraction_d_equals_abc() -> None:
    d = fractional_factorial({"A": [0, 1], "B": [0, 1], "C": [0, 1], "D": [0, 1]}, ["D=ABC"])
    t = d.table
    assert len(t) == 8
    assert list(t["A_coded"]) == [-1, 1] * 4 and list(t["B_coded"]) == [-1, -1, 1, 1] * 2  # Yates order
    assert (t["D_coded"] == t["A_coded"] * t["B_coded"] * t["C_coded"]).all()
    assert d.words == ["ABCD"] and d.resolution == 4
    al = d.aliases(2)
    assert al["A"] == ["BCD"] and al["AB"] == ["CD"] and al["AD"] == ["BC"]
    # columns of main effects are orthogonal
    X = t[[f"{c}_coded" for c in "ABCD"]].to_numpy()
    assert (X.T @ X == 8 * np.eye(4)).all()


def test_quarter_fraction_resolution_iii() -> None:
    names = ["batch", "input_len", "top_k", "experts", "dtype"]
    factors = {"batch": [1, 64], "input_len": [128, 1024], "top_k": [2, 8], "experts": [8, 64],
               "dtype": ["bfloat16", "float16"]}
    d = fractional_factorial(factors, ["D=AB", "dtype=batch*top_k"])
    assert len(d.table) == 8 and d.words == ["ABD", "ACE", "BCDE"] and d.resolution == 3
    assert d.aliases(1)["A"] == ["BD", "CE", "ABCDE"]
    assert set(d.table["dtype"]) == {"bfloat16", "float16"} and list(d.letters) == names
    assert (d.table["experts_coded"] == d.table["batch_coded"] * d.table["input_len_coded"]).all()
    assert defining_relation(["ABD", "ACE"]) == ["ABD", "ACE", "BCDE"]


def test_design_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="'Z' is neither a factor"):
        parse_generator("D=AZ", ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="2 levels per factor; a have 3"):
        fractional_factorial({"a": [1, 2, 3], "b": [1, 2], "c": [1, 2]}, ["C=AB"])
    with pytest.raises(ValueError, match="factor b needs at least 2 levels"):
        full_factorial({"a": [1, 2], "b": [1]})
    with pytest.raises(ValueError, match="expected NAME=LEVEL1,LEVEL2"):
        parse_factor("batch")
    assert parse_factor("batch=1,16") == ("batch", [1, 16]) and parse_factor("dt=bf16,fp8")[1] == ["bf16", "fp8"]


def test_anova_recovers_known_effects() -> None:
    from moelab.lab.anova import anova, residual_plot

    rng = np.random.default_rng(0)
    t = pd.concat([full_factorial({"A": [0, 1], "B": [0, 1], "C": [0, 1]}).table] * 4, ignore_index=True)
    a, b = t["A_coded"], t["B_coded"]
    t["y"] = 10 + 3 * a + 1.5 * a * b + rng.normal(0, 0.3, len(t))  # A and AB matter, B and C do not
    res = anova(t, "y", ["A", "B", "C"], order=2)
    tab = res.table.set_index("term")
    assert tab.loc["A", "p_value"] < 1e-10 and tab.loc["A:B", "p_value"] < 1e-10
    assert tab.loc["B", "p_value"] > 0.01 and tab.loc["C", "p_value"] > 0.01
    # eta^2 by hand: SS_A = N * 3^2 (coded +-1), SS_AB = N * 1.5^2; they dominate the total
    assert tab.loc["A", "eta_sq"] == pytest.approx(9 / (9 + 2.25 + 0.09), abs=0.03)
    assert tab.loc["A:B", "eta_sq"] == pytest.approx(2.25 / (9 + 2.25 + 0.09), abs=0.03)
    assert tab["eta_sq"].sum() == pytest.approx(1.0)  # balanced design: SS add up to the total
    assert res.shapiro_p > 0.01 and res.r_squared > 0.95 and res.dropped == []
    assert residual_plot(res)[:8] == b"\x89PNG\r\n\x1a\n"


def test_anova_drops_aliased_interactions_of_a_fraction() -> None:
    from moelab.lab.anova import anova

    d = fractional_factorial({"A": [0, 1], "B": [0, 1], "C": [0, 1], "D": [0, 1]}, ["D=ABC"])
    t = pd.concat([d.table] * 2, ignore_index=True)
    t["y"] = 5 + 2 * t["A_coded"] + np.random.default_rng(1).normal(0, 0.2, len(t))
    res = anova(t, "y", list("ABCD"), order=2)
    assert res.dropped == ["B:C", "B:D", "C:D"]  # aliased with A:D, A:C, A:B (I = ABCD)
    assert res.table.set_index("term").loc["A", "p_value"] < 1e-6
    with pytest.raises(ValueError, match="columns \\['E'\\] are not in the data"):
        anova(t, "y", ["A", "E"])


def test_doe_design_cli_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moelab.cli import main

    out = tmp_path / "d.csv"
    assert main(["doe", "design", "--factor", "batch=1,4", "--factor", "len=8,16", "--factor", "top_k=1,2",
                 "--generator", "C=AB", "--out", str(out)]) == 0
    t = pd.read_csv(out)
    assert len(t) == 4 and {"batch", "len", "top_k", "run_order"} <= set(t.columns)
    assert "I = ABC; resolution 3" in capsys.readouterr().out


@pytest.mark.parametrize("factors,msg", [(["batch=1,,4"], "no empty level"), (["foo=1,2"], "unknown sweep factor"),
                                         (["batch=a,b"], "not a valid int"),
                                         (["batch=1,2", "batch=4,8"], "more than once")])
def test_doe_design_refuses_what_a_sweep_could_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       factors: list[str], msg: str) -> None:
    """The design is for `bench sweep --design`: unknown factors, bad levels and repeated factors are refused
    before anything is written."""
    from moelab.cli import main

    out = tmp_path / "d.csv"
    argv = ["doe", "design", *[x for f in factors for x in ("--factor", f)], "--out", str(out)]
    assert main(argv) == 2 and msg in capsys.readouterr().err and not out.exists()
