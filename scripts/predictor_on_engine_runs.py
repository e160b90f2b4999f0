"""Leave-one-out error of the predictor on the offline rows of the H100 engine runs in docs/perf/runs/.

    python scripts/predictor_on_engine_runs.py docs/perf/runs/engine-h100-v0.json docs/perf/runs/engine-h100-v1.json

Rows whose time includes Triton compilation (flagged in docs/perf/engine.md: v1's batch 16) are left out.
"""

from __future__ import annotations

import json
import sys

import pandas as pd

from moelab.analysis.predictor import evaluate

EXCLUDE = {("engine-h100-v1", 16)}  # first prefill of that size compiled kernels inside the timing


def rows(path: str) -> list[dict]:
    tag = path.rsplit("/", 1)[-1].removesuffix(".json")
    out = []
    for r in json.load(open(path)):
        if r["kind"] == "offline" and (tag, r["batch"]) not in EXCLUDE:
            out.append(dict(model=r["model"], batch=r["batch"], input_len=r["input_len"], output_len=r["output_len"],
                            metric="output_throughput", value=r["output_tok_s"],
                            floor=r["roofline_output_tok_s"], version=tag))
    return out


def main() -> None:
    df = pd.DataFrame([r for p in sys.argv[1:] for r in rows(p)])
    print(f"{len(df)} rows from {', '.join(sorted(df.version.unique()))}")
    res = evaluate(df, "output_throughput", by=("model", "batch"))
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(res.round(1).to_string(index=False))


if __name__ == "__main__":
    main()
