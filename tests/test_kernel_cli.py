"""`moelab bench kernels` and `moelab tune-kernels` on the CPU (Triton interpreter, tiny shapes), and the
kernel benchmark's floor arithmetic."""

from __future__ import annotations

import sqlite3

import pytest

pytest.importorskip("triton")

from moelab.cli import main  # noqa: E402
from moelab.kernels.fused_moe_config import config_file_name, load_config_file  # noqa: E402
from moelab.lab import kernel_bench as kb  # noqa: E402


def test_bench_kernels_checks_times_and_stores(tmp_path, capsys) -> None:
    store = tmp_path / "r.sqlite"
    rc = main(["bench", "kernels", "--shape", "6,2,16,16", "--m", "1,3", "--dtype", "fp32,fp8_block",
               "--backends", "naive,grouped,triton", "--store", str(store), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "checks: 24/24 passed" in out and "Triton interpreter wall-clock" in out
    con = sqlite3.connect(store)
    assert con.execute("SELECT status FROM runs").fetchall() == [("ok",)]
    metrics = dict(con.execute("SELECT metric, COUNT(*) FROM rows GROUP BY metric").fetchall())
    # checks: 2 M x 2 routings x 3 backends for each dtype (grouped hands quantized experts to the oracle)
    assert metrics["rel_err"] == 12 + 12 and "check" not in metrics and metrics["rel_err_vs_float"] == 4
    assert metrics["layer_ms"] == 2 * 2 + 2 * 2  # grouped + triton, for each dtype
    assert con.execute("SELECT COUNT(*) FROM rows WHERE metric = 'layer_ms' AND floor IS NOT NULL").fetchone() == (0,)


def test_tune_kernels_writes_named_config(tmp_path, capsys) -> None:
    rc = main(["tune-kernels", "--shape", "4,2,16,16", "--m", "3", "--dtype", "int8_channel", "--out",
               str(tmp_path), "--device", "cpu"])
    assert rc == 0, capsys.readouterr()
    path = tmp_path / config_file_name(4, 16, 16, "cpu", "int8_channel")
    assert path.is_file() and set(load_config_file(path)) == {3}


def test_tune_kernels_keeps_the_table_it_does_not_retune(tmp_path, capsys, monkeypatch) -> None:
    """A re-tune of some M merges into the existing table (the other M stay as they were) and lets the existing
    entries compete (tune's baseline); an unwritable --out fails before any tuning, and the old table survives."""
    from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig, save_config_file

    path = tmp_path / config_file_name(4, 16, 16, "cpu", "float32")
    old = {7: MoEConfig(16, GemmConfig(16, 16), GemmConfig(16, 16)), 3: MoEConfig(16, GemmConfig(32, 16),
                                                                                  GemmConfig(16, 16))}
    save_config_file(path, old)
    seen = {}

    def fake_tune(shape, ms, dtype, device, seed=0, baseline=None, **_):
        seen["baseline"] = baseline
        return {m: MoEConfig(32, GemmConfig(32, 32), GemmConfig(32, 32)) for m in ms}

    monkeypatch.setattr(kb, "tune", fake_tune)
    assert main(["tune-kernels", "--shape", "4,2,16,16", "--m", "3", "--dtype", "fp32", "--out", str(tmp_path),
                 "--device", "cpu"]) == 0, capsys.readouterr()
    table = load_config_file(path)
    assert seen["baseline"] == old and table[7] == old[7] and table[3].block_m == 32
    assert "kept M 7" in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("x")
    seen.clear()
    assert main(["tune-kernels", "--shape", "4,2,16,16", "--m", "3", "--dtype", "fp32", "--out",
                 str(blocker / "sub"), "--device", "cpu"]) == 2
    assert "--out" in capsys.readouterr().err and not seen and load_config_file(path) == table


def test_tune_tries_row_block_groupings_where_experts_are_large(monkeypatch) -> None:
    """After the tiles, tune() times group_m on each GEMM of the best config (a layer time that favours 8 on
    gate_up and 16 on down picks exactly those), and only where an expert gets >= GROUP_M_MIN_ROWS rows."""
    seen = []

    def fake_ms(c, **_):
        seen.append(c)
        return 1.0 + abs(c.gate_up.group_m - 8) / 100 + abs(c.down.group_m - 16) / 1000 + (c.block_m != 64) / 10

    monkeypatch.setattr(kb, "_layer_ms", fake_ms)
    E, K = 4, 2
    big = kb.GROUP_M_MIN_ROWS * E // K  # tokens that give each expert GROUP_M_MIN_ROWS rows
    best = kb.tune((E, K, 16, 16), (big, big - 1), "fp32", "cpu", log=lambda _: None)
    assert (best[big].gate_up.group_m, best[big].down.group_m) == (8, 16)
    assert best[big - 1].gate_up.group_m == best[big - 1].down.group_m == 1  # below the threshold: not tried
    assert {c.gate_up.group_m for c in seen} == set(kb.GROUP_M_CANDIDATES)
    seen.clear()  # tiles=False: the groupings of the baseline's tiles only
    from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig

    base = {big: MoEConfig(64, GemmConfig(32, 64), GemmConfig(16, 32))}
    best = kb.tune((E, K, 16, 16), (big,), "fp32", "cpu", log=lambda _: None, baseline=base, tiles=False)
    assert best[big] == MoEConfig(64, GemmConfig(32, 64, group_m=8), GemmConfig(16, 32, group_m=16))
    assert {(c.block_m, c.gate_up.block_n, c.down.block_n) for c in seen[2:]} == {(64, 32, 16)}  # after heur, base


@pytest.mark.parametrize("argv,msg", [(["bench", "kernels", "--shape", "4,2,16"], "E,K,D,I"),
                                      (["bench", "kernels", "--shape", "4,2,16,16", "--dtype", "fp4"], "fp4"),
                                      (["bench", "kernels", "--shape", "4,2,16,16", "--backends", "cutlass"],
                                       "cutlass"),
                                      (["tune-kernels", "--preset", "nope"], "nope"),
                                      (["bench", "kernels", "--shape", "4,2,16,16", "--m", "1,,2"], "--m"),
                                      (["bench", "kernels", "--shape", "4,2,16,16", "--m", ","], "--m"),
                                      (["bench", "kernels", "--shape", "4,2,16,16", "--m", "0"], "positive"),
                                      (["bench", "kernels", "--shape", "4,2,16,16", "--m", "-4"], "positive"),
                                      (["bench", "kernels", "--shape", "4,2,16,16", "--backends", ","], "backend"),
                                      (["tune-kernels", "--preset", "tiny", "--m", ","], "--m")])
def test_bad_input_is_a_clear_error(argv, msg, tmp_path, capsys) -> None:
    assert main(argv + (["--store", str(tmp_path / "s.sqlite")] if argv[0] == "bench" else [])) == 2
    assert msg in capsys.readouterr().err


def test_floor_counts_one_byte_weights_and_each_dtypes_measured_rate() -> None:
    ceil = {"copy_bytes_per_s": 3e12, "matmul_flop_per_s": 8e14, "matmul_fp8_flop_per_s": 1.3e15,
            "matmul_fp32_flop_per_s": 4e14}
    bf16, nbytes, flops = kb.floor_ms((8, 2, 4096, 14336), 1, "bf16", ceil)
    fp8, nbytes8, _ = kb.floor_ms((8, 2, 4096, 14336), 1, "fp8_channel", ceil)
    assert nbytes8 == nbytes / 2 and fp8 == pytest.approx(bf16 / 2)
    big, _, flops = kb.floor_ms((8, 2, 4096, 14336), 16384, "fp8_block", ceil)
    assert big == pytest.approx(flops / 1.3e15 * 1e3)
    w8a16, _, _ = kb.floor_ms((8, 2, 4096, 14336), 16384, "int8_channel", ceil)
    assert w8a16 == pytest.approx(flops / 8e14 * 1e3)
    f32, _, _ = kb.floor_ms((8, 2, 4096, 14336), 16384, "fp32", ceil)
    assert f32 == pytest.approx(flops / 4e14 * 1e3)
    # a rate that was not measured gives no floor, never an estimate
    assert kb.floor_ms((8, 2, 4096, 14336), 16, "fp8_tensor", {**ceil, "matmul_fp8_flop_per_s": None})[0] is None
    assert kb.floor_ms((8, 2, 64, 48), 4, "bf16", kb.measure_ceilings("cpu"))[0] is None
    assert kb.parse_shape("60,6,32,16") == (60, 6, 32, 16)


def test_tune_keeps_the_gemvs_at_one_token_only_where_they_time_faster(monkeypatch) -> None:
    """At M where fused_moe's one-token GEMVs apply, tune() times them against its best tiles and records the
    choice in the entry (gemv true / false); where they do not apply (_gemv_ms None) the entry keeps the default."""
    monkeypatch.setattr(kb, "_layer_ms", lambda c, **_: 1.0 + (c.block_m != 16) / 10)
    for gemv_ms, want in ((0.5, True), (2.0, False), (float("inf"), False), (None, True)):
        monkeypatch.setattr(kb, "_gemv_ms", lambda *a, _v=gemv_ms, **k: _v)
        lines: list[str] = []
        best = kb.tune((4, 2, 16, 16), (1,), "fp32", "cpu", log=lines.append)
        assert best[1].gemv is want and best[1].block_m == 16
        assert any("GEMVs" in ln for ln in lines) == (gemv_ms is not None)
        assert ("gemv" in best[1].to_dict()) == (not want)  # only the non-default choice is written
