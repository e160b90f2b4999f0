"""The main job (`moelab bench`), ANOVA and a profile stored, and the report built from the store only,
checked in headless Chromium when one is available."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.lab.calibrate import measure, record
from moelab.lab.store import ResultsStore

TINY_FLAGS = ["--device", "cpu", "--layers", "2", "--hidden-size", "128", "--heads", "4", "--kv-heads", "4",
              "--experts", "8", "--top-k", "2", "--moe-intermediate-size", "64", "--vocab-size", "512"]


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store filled by the default `moelab bench` (4 points, report written), a stored ANOVA and a profile."""
    d = tmp_path_factory.mktemp("lab")
    old = os.getcwd()
    env = {k: os.environ.get(k) for k in ("MOELAB_STORE", "MOELAB_CACHE")}
    os.environ["MOELAB_STORE"] = str(d / "results.sqlite")
    os.environ["MOELAB_CACHE"] = str(d / "cache")
    os.chdir(d)
    try:
        record(ResultsStore(), measure("cpu", iters=2, quick=True))  # so the main job needs no full calibration
        assert main(["bench"]) == 0
        assert main(["doe", "analyze", "--metric", "throughput", "--factors", "batch,input_len", "--kind", "bench",
                     "--out", str(d / "anova")]) == 0
        assert main(["profile", *TINY_FLAGS, "--batch", "2", "--input-len", "8", "--output-len", "4", "--out",
                     str(d / "prof")]) == 0
        assert main(["analyze", "synthetic", "--preset", "olmoe-1b-7b", "--kind", "zipf:1.1", "--steps", "4",
                     "--tokens", "32", "--out", str(d / "trace.npz")]) == 0
        assert main(["analyze", "routing", str(d / "trace.npz"), "--store"]) == 0
        yield d
    finally:
        os.chdir(old)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_main_job_stores_a_sweep_and_writes_the_report(filled: Path) -> None:
    store = ResultsStore(filled / "results.sqlite")
    bench = store.runs(kind="bench")
    assert len(bench) == 4 and set(bench["status"]) == {"ok"}
    rows = store.rows(kind="bench", metric="throughput")
    assert len(rows) == 8 and rows["pct_of_floor"].notna().all() and (rows["floor"] > rows["value"]).all()
    assert {"ttft", "itl", "tpot", "e2e", "ttft_oneshot"} <= set(store.rows(kind="bench")["metric"])
    assert (filled / "moelab_report" / "report.html").is_file()


def test_stored_anova_and_profile(filled: Path) -> None:
    store = ResultsStore(filled / "results.sqlite")
    (an,) = store.runs(kind="anova")["run_id"]
    terms = set(store.rows(run_id=an, metric="eta_sq")["term"])
    assert terms == {"batch", "input_len", "batch:input_len", "Residual"}
    assert store.artifact(an, "residuals.png")[:4] == b"\x89PNG" and (filled / "anova" / "anova.csv").is_file()
    (pr,) = store.runs(kind="profile")["run_id"]
    share = store.rows(run_id=pr, metric="module_share")
    assert share["value"].sum() == pytest.approx(100.0)
    cats = dict(zip(share["category"], share["value"]))
    assert cats["attention"] > 0 and cats["expert_gemm"] > 0 and cats["routing"] > 0
    assert store.artifact(pr, "trace.json.gz")[:2] == b"\x1f\x8b"  # gzip: Perfetto opens it


def test_report_from_the_store_only(filled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moelab.lab.bench as bench

    def no_runs(*a, **k):
        raise AssertionError("the report must not run the engine")

    monkeypatch.setattr(bench, "build_llm", no_runs)
    out = filled / "rep"
    assert main(["report", "--store", str(filled / "results.sqlite"), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    imgs = re.findall(r"<img src='data:image/png;base64,([^']+)'", page)
    assert len(imgs) >= 6 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in imgs)
    assert "src='http" not in page and "Runs (4)" in page  # self-contained; figures name their runs
    for text in ("Hardware and versions", "Every point", "pct_of_floor", "ANOVA", "Profiles", "LaTeX tables",
                 "\\begin{tabular}"):
        assert text in page, text
    md = (out / "report.md").read_text()
    linked = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert len(linked) == len(imgs) and all((out / p).is_file() for p in linked)
    assert "\\toprule" in (out / "tables.tex").read_text()


def _chromium() -> str | None:
    for name in (os.environ.get("MOELAB_CHROMIUM"), "chromium-headless-shell", "chromium", "chromium-browser",
                 "google-chrome", "headless_shell"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_stored_routing_trace_gets_its_section(filled: Path) -> None:
    from moelab.lab.report import build_report

    store = ResultsStore(filled / "results.sqlite")
    (run,) = store.runs(kind="routing")["run_id"]
    rows = store.rows(run_id=run)
    assert {"trace", "baseline zipf:1.2"} <= set(rows["routing"]) and "gini" in set(rows["metric"])
    md = build_report(store, filled / "rep-routing")["md"].read_text()
    section = md.split("## Routing", 1)[1].split("\n## ", 1)[0]
    assert section.count("![") >= 2 and run in section


def test_report_renders_in_headless_chromium(filled: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from moelab.lab.report import build_report

    exe = _chromium()
    page_path = build_report(ResultsStore(filled / "results.sqlite"), filled / "rep-chromium")["html"]
    expected = len(re.findall(r"<img ", page_path.read_text()))
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"]) if exe else p.chromium.launch()
        except Exception as err:  # no browser binary on this machine
            pytest.skip(f"no headless Chromium (apt-get install chromium-headless-shell, or set MOELAB_CHROMIUM): "
                        f"{str(err).splitlines()[0][:200]}")
        page = browser.new_page()
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        imgs = page.evaluate("() => Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        browser.close()
    assert len(imgs) == expected >= 6 and all(done and width > 0 for done, width in imgs), imgs
