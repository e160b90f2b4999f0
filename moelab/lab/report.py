"""`moelab report`: a self-contained HTML page and a Markdown file built from the results store only.

Nothing is re-run: every number comes from stored rows (the hyperparameter study's ANOVA is computed from the
stored trial rows). Sections: hardware and versions (every distinct provenance, the calibrations), every
benchmark point with its % of floor, per group of comparable points (same model, engine settings and study)
throughput vs batch, throughput vs length, TTFT and ITL vs batch, % of floor vs batch; the hyperparameter study;
ANOVA tables (stored `moelab doe analyze` runs and the study's) with residual plots; profile breakdowns; GPU
telemetry; failed and out-of-memory points; LaTeX tables (also written to tables.tex). HTML images are base64
PNG data URIs; the Markdown links the same PNGs written under figures/. Every figure names its run ids.
"""

from __future__ import annotations

import base64
import html
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from moelab.lab.figures import Figure, breakdown_figure, hparams_figure, latency_figure, line_figure
from moelab.lab.render import html_table, latex_table, md_table
from moelab.lab.tables import BENCH_KINDS, point_table

PROV_COLS = ["host", "gpu_name", "driver", "torch_version", "triton_version", "python_version", "git_sha", "git_dirty"]
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table.t{border-collapse:collapse;font-size:12px;margin:.5em 0}table.t td,table.t th{border:1px solid #ccc;
padding:2px 6px;text-align:right}table.t td:nth-child(-n+3){text-align:left}table.t th{background:#f3f3f3}
figure{margin:1.2em 0}img{max-width:100%}
figcaption{font-size:12px;color:#555}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:11px}
.ids{font-family:monospace;font-size:11px;word-break:break-all}"""


class Doc:
    """Collects sections once, renders them as HTML and Markdown."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[tuple[str, Any]] = []
        self.figures: list[Figure] = []

    def h(self, text: str) -> None:
        self.parts.append(("h", text))

    def p(self, text: str) -> None:
        self.parts.append(("p", text))

    def table(self, df: Any) -> None:
        self.parts.append(("table", df))

    def pre(self, text: str) -> None:
        self.parts.append(("pre", text))

    def figure(self, fig: Figure | None) -> None:
        if fig is not None:
            self.figures.append(fig)
            self.parts.append(("fig", fig))

    def html(self) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        for kind, x in self.parts:
            if kind == "h":
                out.append(f"<h2>{html.escape(x)}</h2>")
            elif kind == "p":
                out.append(f"<p>{html.escape(x)}</p>")
            elif kind == "table":
                out.append(html_table(x))
            elif kind == "pre":
                out.append(f"<pre>{html.escape(x)}</pre>")
            else:
                src = "data:image/png;base64," + base64.b64encode(x.png).decode()
                out.append(f"<figure><img src='{src}' alt='{html.escape(x.title)}'><figcaption>"
                           f"{html.escape(x.caption)} Runs ({len(x.run_ids)}): <span class='ids'>"
                           f"{html.escape(', '.join(x.run_ids))}</span></figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def markdown(self, fig_dir: Path) -> str:
        out = [f"# {self.title}\n"]
        n = 0
        for kind, x in self.parts:
            if kind == "h":
                out.append(f"## {x}\n")
            elif kind == "p":
                out.append(f"{x}\n")
            elif kind == "table":
                out.append(md_table(x))
            elif kind == "pre":
                out.append(f"```\n{x}\n```\n")
            else:
                n += 1
                name = f"fig{n:02d}-{_slug(x.title)}.png"
                (fig_dir / name).write_bytes(x.png)
                out.append(f"![{x.title}]({fig_dir.name}/{name})\n\n*{x.caption} Runs ({len(x.run_ids)}): "
                           f"{', '.join(x.run_ids)}*\n")
        return "\n".join(out)


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:50]


def _get(cfg: dict, *keys: str) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def points(store: Any) -> Any:
    """One row per benchmark run: point_table's numbers plus family, group, length, ffn, experts, top_k, floor.

    family: the study (if any), model, device, dtype and MoE backend. group: the family split further by every
    shape override, top-k and workload kind that varies inside it, so the points of a group differ only in
    batch and lengths (the hyperparameter figure uses the family)."""
    import pandas as pd

    tbl = point_table(store)
    if tbl.empty:
        return tbl
    runs = store.runs(run_id=list(tbl["run_id"])).set_index("run_id")
    recs, variants = [], []
    for rid in tbl["run_id"]:
        run = runs.loc[rid]
        cfg, wl, ex = run["config"], run["workload"], run["extra"]
        dev = _get(cfg, "resolved.device", "device")
        sig = " ".join(str(x) for x in (cfg.get("model"), dev, _get(cfg, "resolved.dtype", "dtype"),
                                        _get(cfg, "resolved.moe_backend", "moe_backend")))
        variants.append({**{k.split(".", 1)[1]: v for k, v in cfg.items() if k.startswith("overrides.")},
                         "top_k": cfg.get("top_k"), "workload": wl.get("kind"), "range_ratio": wl.get("range_ratio")})
        i, o = wl.get("input_len"), wl.get("output_len")
        fl = ex.get("floor") or {}
        recs.append({"family": f"{wl['study']} | {sig}" if wl.get("study") else sig,
                     "length": str(i) if i == o else f"{i}/{o}",
                     "ffn": _get(cfg, "spec.moe_intermediate_size", "overrides.moe_intermediate_size"),
                     "experts": _get(cfg, "spec.experts", "overrides.experts"),
                     "top_k": _get(cfg, "spec.top_k", "top_k", "overrides.top_k"),
                     "floor_s": fl.get("total_s"), "bound": fl.get("bound"),
                     "layers": _get(cfg, "spec.layers", "overrides.layers")})
    extra = pd.DataFrame(recs, index=tbl.index)
    var = pd.DataFrame(variants, index=tbl.index).astype(str)
    groups = []
    for idx, fam in extra["family"].items():
        members = var[extra["family"] == fam]
        varying = [c for c in members.columns if members[c].nunique() > 1]
        label = ",".join(f"{c}={var.at[idx, c]}" for c in varying)
        groups.append(fam + (f" [{label}]" if label else ""))
    extra["group"] = groups
    return pd.concat([tbl.drop(columns=[c for c in extra.columns if c in tbl.columns]), extra], axis=1)


def _natural(v: Any) -> tuple:
    return tuple(int(p) if str(p).isdigit() else 0 for p in str(v).split("/"))


def _hardware(doc: Doc, store: Any) -> None:
    doc.h("Hardware and versions")
    runs = store.runs()
    prov = runs[PROV_COLS].astype(str).drop_duplicates() if not runs.empty else runs
    doc.table(prov)
    cal = store.rows(kind="calibrate")
    if not cal.empty:
        piv = cal.pivot_table(index=["run_id", "device_key"], columns="metric", values="value", aggfunc="first")
        piv = piv.reset_index()
        for c in [c for c in piv.columns if "bandwidth" in str(c)]:
            piv[c] = piv[c] / 1e9
        for c in [c for c in piv.columns if str(c).startswith("matmul")]:
            piv[c] = piv[c] / 1e12
        doc.p("Calibrations (bandwidths in GB/s, matmul rates in TFLOP/s); every floor divides by the latest "
              "calibration of its device.")
        doc.table(piv)


def _groups(doc: Doc, pts: Any, latex: list[str]) -> None:
    multi = [(group, g) for group, g in pts.groupby("group", sort=False) if len(g) > 1]
    for gi, (group, g) in enumerate(multi):
        g = g.copy()
        doc.h(f"Group {gi + 1}: {group}")
        ids = ", ".join(g["run_id"])
        cap = f"{group}; median of trials, bars = min..max over trials."
        doc.figure(line_figure(g, "batch", "throughput", "length", f"throughput vs batch: {group}",
                               "throughput (tok/s, in+out)", cap, logx=True, series_label="len {}"))
        doc.figure(line_figure(g.assign(input=g["input_len"]), "input", "throughput", "batch",
                               f"throughput vs length: {group}", "throughput (tok/s, in+out)",
                               cap + " x = input length (output length as in the table).", logx=True,
                               series_label="batch {}"))
        doc.figure(latency_figure(g, f"TTFT and ITL: {group}", f"{group}; median over trials."))
        doc.figure(line_figure(g, "batch", "pct_of_floor", "length", f"% of floor vs batch: {group}",
                               "% of floor (100 = at the roofline)", f"{group}; floor = roofline time of the run.",
                               logx=True, series_label="len {}"))
        if g["batch"].nunique() > 1 and g["length"].nunique() > 1 and "throughput" in g:
            ok = g[g["status"] == "ok"]
            for col, what in (("throughput", "throughput (tok/s, input + output)"), ("pct_of_floor", "% of floor")):
                piv = ok.pivot_table(index="batch", columns="length", values=col, aggfunc="median")
                piv = piv[sorted(piv.columns, key=_natural)]
                latex.append(latex_table(piv.round(1), f"{what}, {group}; runs {ids}",
                                         f"tab:{_slug(group)}-{col}", index_name="batch"))


def _hparams(doc: Doc, pts: Any, store: Any, latex: list[str]) -> None:
    from moelab.lab.anova import anova, residual_plot

    for group, g in pts.groupby("family", sort=False):
        if g["ffn"].nunique() < 2 or g["experts"].nunique() < 2 or g["top_k"].nunique() < 2:
            continue
        doc.h(f"Hyperparameter study: {group}")
        layers = sorted({str(x) for x in g["layers"]} - {"None", "nan"})
        doc.p(f"Expert FFN size x experts x top-k; layers = {', '.join(layers) or 'as the preset'} (reduced to fit "
              f"one GPU where stated). {int((g['status'] == 'oom').sum())} of {len(g)} points ran out of memory.")
        doc.figure(hparams_figure(g, f"throughput: {group}", f"{group}; red x = out of memory."))
        ok = g[g["status"] == "ok"]
        if not ok.empty and "throughput" in ok:
            piv = ok.pivot_table(index=["experts", "ffn"], columns="top_k", values="throughput", aggfunc="median")
            latex.append(latex_table(piv.round(1).reset_index(), f"throughput (tok/s), {group}",
                                     f"tab:{_slug(group)}-hparams"))
        rows = store.rows(run_id=list(ok["run_id"]), metric="throughput") if len(ok) >= 4 else None
        if rows is None or rows.empty:
            continue
        eff = g.set_index("run_id")[["ffn", "experts", "top_k"]]
        rows = rows.drop(columns=[c for c in ("ffn", "experts", "top_k") if c in rows.columns]).join(eff, on="run_id")
        try:
            res = anova(rows, "value", ["ffn", "experts", "top_k"], order=2, log=True)
        except ValueError as err:
            doc.p(f"ANOVA not possible: {err}")
            continue
        _anova_block(doc, res.table, f"ANOVA of log throughput ~ ffn x experts x top-k ({group})", res.r_squared,
                     res.shapiro_w, res.shapiro_p, res.dropped, residual_plot(res), sorted(ok["run_id"]))


def _anova_block(doc: Doc, table: Any, title: str, r2: float, w: float, p: float, dropped: list[str], png: bytes,
                 ids: list[str]) -> None:
    doc.p(f"{title}: R^2 = {r2:.4f}; Shapiro-Wilk on residuals W = {w:.4f}, p = {p:.4g}"
          + (f"; not estimable (aliased or missing points): {', '.join(dropped)}" if dropped else "") + ".")
    doc.table(table)
    doc.figure(Figure(f"residuals: {title}", png, "Residuals vs fitted and normal Q-Q.", ids))


def _stored_anovas(doc: Doc, store: Any) -> None:
    runs = store.runs(kind="anova", status="ok")
    if runs.empty:
        return
    doc.h("ANOVA (stored analyses)")
    for _, run in runs.iterrows():
        rows = store.rows(run_id=run["run_id"])
        tab = rows[rows["term"].notna()].pivot_table(index="term", columns="metric", values="value", aggfunc="first")
        cols = [c for c in ("df", "sum_sq", "mean_sq", "F", "p_value", "eta_sq", "partial_eta_sq") if c in tab]
        tab = tab[cols].reset_index()
        scal = dict(zip(rows["metric"], rows["value"]))
        try:
            png = store.artifact(run["run_id"], "residuals.png")
        except ValueError:
            png = b""
        ex = run["extra"]
        ids = list(ex.get("source_runs", []))
        title = f"{ex.get('title', run['run_id'])} (analysis {run['run_id']})"
        if png:
            _anova_block(doc, tab, title, scal.get("r_squared", np.nan), scal.get("shapiro_w", np.nan),
                         scal.get("shapiro_p", np.nan), ex.get("dropped", []), png, ids)


def _profiles(doc: Doc, store: Any) -> None:
    rows = store.rows(kind="profile", metric="module_share")
    if rows.empty:
        return
    doc.h("Profiles: time per module")
    rows = rows.assign(label=rows["run_id"] + " " + rows["device"], share=rows["value"])
    doc.figure(breakdown_figure(rows, "time breakdown per profile run", "Share of profiled time per category "
                                "(CPU: operator self time; CUDA: kernel time; CUDA exposed: kernel time not "
                                "overlapped by an earlier kernel, which under PDL is what a kernel adds)."))
    piv = rows.pivot_table(index="label", columns="category", values="share", aggfunc="sum").round(1).reset_index()
    doc.table(piv)


def _telemetry(doc: Doc, store: Any) -> None:
    runs = store.runs(kind=list(BENCH_KINDS), status="ok")
    recs, reasons = [], set()
    for _, r in runs.iterrows():
        tel = r["extra"].get("telemetry") or {}
        if tel.get("samples"):
            recs.append({"run_id": r["run_id"], "source": tel.get("source"),
                         **{k: tel.get(k) for k in ("gpu_util_mean", "mem_used_max", "power_mean", "power_max",
                                                    "sm_clock_mean")}})
        elif tel.get("reason"):
            reasons.add(tel["reason"])
    if recs or reasons:
        doc.h("GPU telemetry")
    if recs:
        import pandas as pd

        doc.p("Sampled during the timed trials: utilization %, memory MiB, power W, SM clock MHz.")
        doc.table(pd.DataFrame(recs))
    if reasons:
        doc.p("Runs without telemetry: " + "; ".join(sorted(reasons)) + ".")


def _routing(doc: Doc, store: Any) -> None:
    from moelab.analysis.figures import routing_figures
    from moelab.lab.figures import Figure, _png
    from moelab.lab.routing_store import stored_traces

    traces = stored_traces(store)
    if not traces:
        return
    doc.h("Routing")
    doc.p("Tokens per expert per MoE layer, recorded by the engine. On synthetic (seeded random) weights the router "
          "is near-uniform, so the table puts skewed synthetic baselines (Zipf, hot set: same experts, top-k, layers, "
          "steps and tokens) beside the measured trace for scale.")
    for run_id, trace in traces:
        rows = store.rows(run_id=run_id)
        summary = rows[rows["scope"].eq("all layers")] if "scope" in rows else rows
        if not summary.empty:
            piv = summary.pivot_table(index="routing", columns="metric", values="value").round(3).reset_index()
            doc.table(piv)
        over = rows[rows["metric"].eq("recording_overhead")]
        what = f"{trace.model or '?'} ({trace.source}), E={trace.num_experts}, K={trace.top_k}, {trace.num_steps} " \
               f"steps, {int(trace.num_tokens)} tokens"
        if not over.empty:
            doc.p(f"{what}: recording overhead {over['value'].iloc[0]:+.2f} % of the workload's time.")
        for name, fig in routing_figures(trace).items():
            doc.figure(Figure(f"{name.replace('_', ' ')} ({trace.model})", _png(fig, tight=False),
                              f"{what}.", [run_id]))


def build_report(store: Any, out: Path, title: str = "moelab results") -> dict[str, Path]:
    """Write out/report.html (self-contained), out/report.md (+ out/figures/*.png) and out/tables.tex."""
    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    doc = Doc(title)
    runs = store.runs()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts = runs.groupby(["kind", "status"]).size().to_dict() if not runs.empty else {}
    doc.p(f"Built {now} from {store.path} ({len(runs)} runs: "
          + ", ".join(f"{k} {s} {n}" for (k, s), n in counts.items()) + "). Nothing was re-run. Throughput = "
          "sum(input + output tokens) / end-to-end time (MoE-Inference-Bench); % of floor = 100 x roofline time / "
          "measured time.")
    _hardware(doc, store)
    latex: list[str] = []
    pts = points(store)
    if not pts.empty:
        doc.h("Every point")
        cols = [c for c in ("run_id", "status", "group", "batch", "length", "throughput", "throughput_cv",
                            "output_throughput", "floor_s", "bound", "pct_of_floor", "ttft_oneshot", "itl_median",
                            "tpot_median") if c in pts]
        doc.table(pts[cols])
        _groups(doc, pts, latex)
        _hparams(doc, pts, store, latex)
    _stored_anovas(doc, store)
    _profiles(doc, store)
    _routing(doc, store)
    _telemetry(doc, store)
    bad = runs[runs["status"].isin(["oom", "failed"])] if not runs.empty else runs
    if not bad.empty:
        doc.h("Out-of-memory and failed points")
        doc.table(bad[["run_id", "kind", "status", "error"]].assign(error=bad["error"].str.slice(0, 160)))
    if latex:
        doc.h("LaTeX tables")
        doc.pre("\n".join(latex))
    paths = {"html": out / "report.html", "md": out / "report.md", "tex": out / "tables.tex"}
    paths["html"].write_text(doc.html(), encoding="utf-8")
    paths["md"].write_text(doc.markdown(fig_dir), encoding="utf-8")
    paths["tex"].write_text("\n".join(latex), encoding="utf-8")
    return paths
