"""ANOVA of a measured response over named factors: main effects and interactions, effect sizes, residual checks.

Model: ordinary least squares (statsmodels `ols`) of the response (optionally its natural log) on every factor
as a categorical term with sum-to-zero coding, plus every interaction of up to `order` factors. A term that is
linearly dependent on earlier terms (aliased in a fractional design, or not estimable because points are
missing, e.g. out of memory) is dropped and listed in `dropped`. Sums of squares are Type II
(statsmodels `anova_lm(typ=2)`; equal to Type I for a balanced orthogonal design).

Effect sizes: eta^2 = SS_term / SS_total, partial eta^2 = SS_term / (SS_term + SS_residual), where SS_total
is the total sum of squares about the mean. Residual checks: Shapiro-Wilk normality test of the residuals
(scipy; needs 3 <= n <= 5000) and a residuals-vs-fitted plot plus a normal Q-Q plot (`residual_plot`).
Replicates (the trials of a point) give the residual degrees of freedom; with none left (a saturated model)
F and p are NaN and only SS and eta^2 are reported.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class AnovaResult:
    table: Any  # pandas.DataFrame: term, df, sum_sq, mean_sq, F, p_value, eta_sq, partial_eta_sq
    response: str
    factors: list[str]
    n: int
    r_squared: float
    dropped: list[str] = field(default_factory=list)
    shapiro_w: float = math.nan
    shapiro_p: float = math.nan
    fitted: Any = None
    residuals: Any = None
    log: bool = False


def _term_name(combo: Sequence[str]) -> str:
    return ":".join(combo)


def anova(df, response: str, factors: Sequence[str], order: int = 2, log: bool = False) -> AnovaResult:
    """ANOVA of df[response] on df[factors] (see the module docstring). Rows with a missing response are dropped."""
    try:
        import statsmodels.formula.api as smf
        from statsmodels.stats.anova import anova_lm
    except ImportError:
        raise ValueError("ANOVA needs statsmodels (pip install statsmodels)") from None
    import pandas as pd
    from patsy import dmatrix
    from scipy import stats

    factors = list(factors)
    missing = [c for c in [response, *factors] if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the data; available: {', '.join(map(str, df.columns))}")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    data = df[[response, *factors]].dropna(subset=[response]).copy()
    if log:
        if (data[response] <= 0).any():
            raise ValueError(f"--log needs a positive response; {response} has values <= 0")
        data[response] = np.log(data[response].astype(float))
    safe = {f: f"f{i}" for i, f in enumerate(factors)}
    data = data.rename(columns={**safe, response: "y"})
    for f in safe.values():
        data[f] = data[f].astype(str)
    constant = [f for f, s in safe.items() if data[s].nunique() < 2]
    if constant:
        raise ValueError(f"factors {constant} have a single level in the data; an effect needs at least two")
    data["y"] = data["y"].astype(float)
    back = {v: k for k, v in safe.items()}
    candidates = [combo for r in range(1, order + 1) for combo in itertools.combinations(safe.values(), r)]
    kept, dropped, rank = [], [], 1
    for combo in candidates:  # keep a term only if it adds its full degrees of freedom
        trial = kept + [combo]
        formula = " + ".join(":".join(f"C({f}, Sum)" for f in c) for c in trial)
        X = np.asarray(dmatrix(formula, data))
        new_rank = np.linalg.matrix_rank(X)
        dof = int(np.prod([data[f].nunique() - 1 for f in combo]))
        if new_rank - rank >= dof:
            kept.append(combo)
            rank = new_rank
        else:
            dropped.append(_term_name([back[f] for f in combo]))
    formula = "y ~ " + " + ".join(":".join(f"C({f}, Sum)" for f in c) for c in kept)
    model = smf.ols(formula, data=data).fit()
    resid_df = model.df_resid
    if resid_df > 0:
        table = anova_lm(model, typ=2)
    else:  # saturated: sums of squares from a Type I table, no test
        table = anova_lm(model, typ=1)
        table["F"] = np.nan
        table["PR(>F)"] = np.nan
    table = table.rename(columns={"PR(>F)": "p_value"})
    ss_total = float(((data["y"] - data["y"].mean()) ** 2).sum())
    ss_resid = float(model.ssr)
    names = []
    for idx in table.index:
        if idx == "Residual":
            names.append("Residual")
            continue
        parts = [p.split(",")[0].removeprefix("C(") for p in idx.split(":")]
        names.append(_term_name([back[p] for p in parts]))
    table.index = names
    table["mean_sq"] = table["sum_sq"] / table["df"]
    table["eta_sq"] = table["sum_sq"] / ss_total if ss_total > 0 else np.nan
    table["partial_eta_sq"] = table["sum_sq"] / (table["sum_sq"] + ss_resid) if ss_resid > 0 else np.nan
    table.loc["Residual", ["partial_eta_sq", "F", "p_value"]] = np.nan
    table = table.reset_index().rename(columns={"index": "term"})
    table = table[["term", "df", "sum_sq", "mean_sq", "F", "p_value", "eta_sq", "partial_eta_sq"]]
    resid = np.asarray(model.resid)
    w = p = math.nan
    if 3 <= len(resid) <= 5000 and np.ptp(resid) > 0:
        w, p = (float(x) for x in stats.shapiro(resid))
    return AnovaResult(pd.DataFrame(table), response, factors, int(len(data)), float(model.rsquared), dropped,
                       w, p, np.asarray(model.fittedvalues), resid, log)


def residual_plot(res: AnovaResult, title: str = "") -> bytes:
    """PNG bytes: residuals vs fitted values (left) and a normal Q-Q plot of the residuals (right)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.scatter(res.fitted, res.residuals, s=14, alpha=0.8)
    a.axhline(0, color="gray", lw=0.8)
    a.set_xlabel("fitted" + (" (log)" if res.log else ""))
    a.set_ylabel("residual")
    a.set_title("residuals vs fitted")
    stats.probplot(res.residuals, dist="norm", plot=b)
    b.set_title(f"normal Q-Q (Shapiro-Wilk p = {res.shapiro_p:.3g})")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
