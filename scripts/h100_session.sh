#!/usr/bin/env bash
# The H100 measurements quoted in docs/perf and the issue notes, one section per argument:
#   bash scripts/h100_session.sh gpu-tests gpu-kernel-tests tune tune-fp8 engine kernels trace serve lab lab-qwen quant quant-ab moe-profile moe moe-gemv grid-sync mla-prep qwen-mix early-residual early-routing gate-in-router small-shapes s13-ab moe-gaps moe-profile-pdl exposed s15 s15b s15c s17 s17b s17c s15d ws-down block-merge group-m group-m-bf16 quant-big
#   (on the device, repo root)
# Every section writes under $OUT. The GPU image lacks the server's packages: they come as wheels in .wheels/
# (scripts/make_wheels.sh makes them; pass carry=[".wheels"] to the device run).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=. MOELAB_STORE="$OUT/lab.sqlite"
if [ -d .wheels ]; then  # install into .wheels/site (relative; ignored) without touching the image's packages
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .wheels/site \
    .wheels/*.whl 2>&1 | tail -3
  export PYTHONPATH=.:$PWD/.wheels/site
fi
python -c "import fastapi, uvicorn, httpx; print('server packages: ok')" || echo "server packages missing" >&2
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
engine_ab() {  # engine_ab TAG FLAG MODEL...: batch-1 decode of each model, on / off (FLAG) / on / off
  local tag=$1 flag=$2 m v F
  shift 2
  for m in "$@"; do
    for v in on off on off; do
      F=; [ $v = off ] && F=$flag
      echo "== $m $tag $v"
      python scripts/bench_engine_gpu.py --out "$OUT/$tag-$m-$v" --models "$m" --decode-batches 1 \
        --offline-batches --profile-batches --skip-check --steps 30 $F 2>&1 | grep -E "decode B="
    done
  done
}
flag_ab() {  # flag_ab FLAG TAG TIMEOUT BENCH_ARG...: bench_moe_gpu.py --quant with --FLAG off, then on (off first: its
  local flag=$1 tag=$2 limit=$3 v  # precompile leaves every kernel but the flagged variants in the cache), logs kept
  shift 3
  for v in off on; do
    echo "== $tag $v"
    mkdir -p "$OUT/$tag-$v"
    OUT="$OUT/$tag-$v" timeout "$limit" python scripts/bench_moe_gpu.py --quant --no-check "$@" "--$flag" $v 2>&1 \
      | tee "$OUT/$tag-$v/log.txt" | grep -E "^quant: [a-z0-9-]+ +[0-9]+ (fp8|int8)|block-scale"
  done
}
for section in "$@"; do
  echo "== $section $(date +%T)"
  case "$section" in
    gpu-tests)  # the CUDA-only tests (bf16 kernels, CUDA graphs, no host sync when launching a step), compiled
      MOELAB_TEST_GPU=1 python -m pytest -q -p no:cacheprovider tests -k "cuda or never_waits" -rs --ignore tests/test_server.py --ignore tests/test_soak.py \
        --ignore tests/test_serving_bench.py 2>&1 | tail -40 ;;  # the image has no fastapi/uvicorn
    gpu-kernel-tests)  # the fused-MoE, quantized-expert and GEMV tests compiled on the GPU (tensors on DEV; ~140 s)
      MOELAB_TEST_GPU=1 python -m pytest -q -p no:cacheprovider tests/test_moe_quant.py tests/test_fused_moe.py tests/test_gemv.py tests/test_argmax.py \
        --tb=line 2>&1 | tail -40 ;;
    tune-fp8)  # fp8 tiles of the four benchmark shapes at the seven token counts (precompiled on 12 processes)
      for fmt in fp8_channel fp8_block; do
        python scripts/tune_engine_shapes_gpu.py --dtype "$fmt" --deadline 420 olmoe:1,16,64,256,1024,4096,16384 \
          qwen3:1,16,64,256,1024,4096,16384 dsv2-lite:1,16,64,256,1024,4096,16384 \
          mixtral:1,16,64,256,1024,4096,16384 2>&1 | grep -E "^tune|wrote|deadline"
      done ;;
    tune)  # MoE tiles of the engine's shapes at its decode and prefill token counts, merged into this GPU's tables
      python scripts/tune_engine_shapes_gpu.py olmoe:1,64,256,2048,8192 qwen1.5:1,64,256,2048,8192 \
        dsv2-lite:1,64,256,2048,8192 2>&1 | grep -E "kept|changed|wrote" ;;
    engine)
      python scripts/bench_engine_gpu.py --out "$OUT" --steps 20 --offline-trials 3 2>&1 | grep -v -i warn ;;
    kernels)  # decode-path kernels against the paths they replace; attention launch-shape sweep
      python scripts/bench_decode_kernels_gpu.py --budget-s 200 2>&1 | tail -3 ;;
    trace)
      python -m moelab trace --model olmoe-1b-7b --batch 64 --input-len 128 --output-len 128 --measure-overhead \
        --trials 3 --out "$OUT/olmoe_routing.npz" --json "$OUT/trace.json" 2>&1 | grep -v -i warn ;;
    serve)
      python -m moelab serve olmoe-1b-7b --port 8011 --max-model-len 1024 --disable-uvicorn-access-log \
        > "$OUT/serve.log" 2>&1 &
      pid=$!
      for _ in $(seq 240); do  # wait for /health; give up as soon as the server process is gone
        kill -0 "$pid" 2>/dev/null || { echo "server died:"; tail -20 "$OUT/serve.log"; break; }
        python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8011/health', timeout=1)" 2>/dev/null \
          && break
        sleep 1
      done
      kill -0 "$pid" 2>/dev/null || continue
      for c_n in 1:16 16:64 64:256 256:512; do
        python -m moelab bench serve --base-url http://127.0.0.1:8011 --concurrency "${c_n%%:*}" \
          --num-prompts "${c_n##*:}" --input-len 128 --output-len 128 --ignore-eos --num-warmups 2 --ready-check-timeout-sec 30 \
          --save-result --result-dir "$OUT" --label "moelab-olmoe-c${c_n%%:*}" 2>&1 | grep -v -i warn | tail -25
      done
      kill -TERM "$pid"; wait "$pid"; tail -5 "$OUT/serve.log" ;;
    lab)  # calibration, then MoE-Inference-Bench's grid on OLMoE (throughput mode, 2 trials a point)
      python -m moelab calibrate
      python -m moelab bench sweep --study mib-grid --model olmoe-1b-7b --modes throughput --trials 2 --resume \
        --plain 2>&1 | grep -v -i warn | tail -40 ;;
    lab-qwen)  # as much of the grid on Qwen1.5-MoE-A2.7B as the time allows: short lengths first
      python -m moelab bench sweep --model qwen1.5-moe-a2.7b --grid batch=1,16,32,64,128 len=128,256,512 \
        --modes throughput --trials 2 --resume --plain 2>&1 | grep -v -i warn | tail -20 ;;
    quant)  # fused MoE kernel: bf16 vs FP8 W8A8 (tensor/channel/block) and INT8 W8A16, checks and timings
      python scripts/bench_moe_gpu.py --quant --ms 1,16,64,256,1024,4096,16384 2>&1 | grep -v -i warn | tail -75 ;;
    quant-ab)  # fp8 activations quantized in their own launches vs inside others (moelab/kernels/fused_moe.py)
      for mode in separate fused; do
        OUT="$OUT/ab-$mode" python scripts/bench_moe_gpu.py --quant --formats fp8_channel --act-quant $mode \
          --ms 1,16,64,256,1024 2>&1 | grep -E "^quant:|fp8 activations" | grep -v "^quant: shape"
      done ;;
    moe-profile)  # kernel times inside one MoE layer call, bf16 vs fp8 (PDL off so that they add up)
      python scripts/profile_moe_layer_gpu.py olmoe:1,256 mixtral:1,256 qwen3:1 dsv2-lite:1 \
        --dtypes bf16 fp8_channel fp8_block 2>&1 | grep -v -i warn ;;
    moe-profile-pdl)  # the same with PDL on: what each kernel adds to the layer (exposed time) at the fp8 gaps
      python scripts/profile_moe_layer_gpu.py olmoe:1,256 qwen3:1 dsv2-lite:1 mixtral:4096 --pdl \
        --dtypes bf16 fp8_channel fp8_block 2>&1 | grep -v -i warn ;;
    moe)  # fused MoE kernel bf16: 4 shapes x 7 M against the floor and the published (H100) reference
      python scripts/bench_moe_gpu.py ${MOE_ARGS:-} 2>&1 | grep -v -i warn | tail -80 ;;
    moe-gemv)  # one-token experts (bf16, int8) and shared experts as GEMVs: CUDA tests, the layer alone, engine A/Bs
      MOELAB_TEST_GPU=1 python -m pytest -q -p no:cacheprovider tests/test_moe_gemv.py --tb=short 2>&1 | tail -3
      python scripts/bench_moe_gemv_gpu.py --quant --budget-s 150 2>&1 | grep -E "kind=(check|layer|quant)"
      engine_ab moe-gemv --no-moe-gemv olmoe-1b-7b qwen1.5-moe-a2.7b deepseek-v2-lite
      engine_ab mlp-gemv --no-mlp-gemv qwen1.5-moe-a2.7b deepseek-v2-lite ;;  # shared experts: gate_up_gemv
    mla-prep)  # exp/mla-prep: one-token MLA kernels (mla_prep, mla_uv); CUDA checks, then B=1 A/Bs on DeepSeek
      MOELAB_TEST_GPU=1 python -m pytest -q -p no:cacheprovider tests/test_mla_decode.py --tb=short 2>&1 | tail -3
      for v in both none both prep-only uv-only none; do
        case $v in both) F= ;; none) F="--no-mla-prep --no-mla-uv" ;; prep-only) F=--no-mla-uv ;;
          uv-only) F=--no-mla-prep ;; esac
        echo "== deepseek-v2-lite mla $v"
        python scripts/bench_engine_gpu.py --out "$OUT/mla-$v" --models deepseek-v2-lite --decode-batches 1 \
          --offline-batches --profile-batches --steps 30 $F 2>&1 | grep -E "decode B=|rel err"
      done ;;
    qwen-mix)  # exp/qwen-mix-in-norm: Qwen2-MoE's routed sum and gated shared mix inside the next norm (A/B)
      for v in on off on off; do
        F=; [ $v = off ] && F=--no-qwen-mix-fold
        echo "== qwen1.5-moe-a2.7b qwen-mix-fold $v"
        python scripts/bench_engine_gpu.py --out "$OUT/qwen-mix-$v" --models qwen1.5-moe-a2.7b --decode-batches 1 64 \
          --offline-batches --profile-batches --steps 30 $F 2>&1 | grep -E "decode B=|rel err"
      done ;;
    early-residual)  # norms read the residual (two launches old) and norm weights before their PDL wait: A/B
      MOELAB_TEST_GPU=1 python -m pytest -q -p no:cacheprovider tests/test_small_kernels.py -k cuda --tb=short 2>&1 | tail -2
      engine_ab early-residual --no-early-residual olmoe-1b-7b qwen1.5-moe-a2.7b deepseek-v2-lite ;;
    early-routing)  # routed experts after a shared expert read their ids before the PDL wait: A/B (Qwen1.5, DeepSeek)
      MOELAB_TEST_GPU=1 python -m pytest -q -p no:cacheprovider tests/test_moe_gemv.py --tb=short 2>&1 | tail -2
      engine_ab early-routing --no-early-routing qwen1.5-moe-a2.7b deepseek-v2-lite ;;
    gate-in-router)  # exp/qwen-gate-in-router: Qwen2-MoE's shared gate as a row of the router kernel: A/B, B=1 and 64
      MOELAB_TEST_GPU=1 python -m pytest -q -p no:cacheprovider tests/test_small_kernels.py -k cuda --tb=short 2>&1 | tail -2
      for v in on off on off; do
        F=; [ $v = off ] && F=--no-gate-in-router
        echo "== qwen1.5-moe-a2.7b gate-in-router $v"
        python scripts/bench_engine_gpu.py --out "$OUT/gate-in-router-$v" --models qwen1.5-moe-a2.7b \
          --decode-batches 1 64 --offline-batches --profile-batches --steps 30 $F 2>&1 | grep -E "decode B=|rel err"
      done
      echo "== deepseek-v2-lite bf16 check with the early expert ids (main's v10 change)"
      python scripts/bench_engine_gpu.py --out "$OUT/dsv2-check" --models deepseek-v2-lite --decode-batches 1 64 \
        --offline-batches --profile-batches --steps 10 2>&1 | grep -E "decode B=|rel err" ;;
    small-shapes)  # exp/small-shapes: launch shapes of the batch-1 step's small kernels, in the engine (OLMoE B=1)
      for F in "--norm-warps 4" "--norm-warps 8" "--norm-warps 16" "--norm-warps 2" "--rope-warps 2" "--rope-warps 8" \
          "--router-shape 8,4" "--router-shape 16,2" "--router-shape 16,8" "--router-shape 4,4" "--norm-warps 4"; do
        echo "== olmoe-1b-7b small-shapes [$F]"
        python scripts/bench_engine_gpu.py --out "$OUT/small-shapes" --models olmoe-1b-7b --decode-batches 1 \
          --offline-batches --profile-batches --skip-check --steps 30 $F 2>&1 | grep -E "decode B="
      done ;;
    s13-ab)  # session 13: one-row add_rms_norm at 16 warps (3 models), router 16,8, gate-in-router only above one row
      for m in olmoe-1b-7b qwen1.5-moe-a2.7b deepseek-v2-lite; do
        for F in "--norm-warps 16" "--norm-warps 4" "--norm-warps 16" "--norm-warps 4"; do  # (4: the v10 default)
          echo "== $m [$F]"
          python scripts/bench_engine_gpu.py --out "$OUT/s13-$m" --models $m --decode-batches 1 \
            --offline-batches --profile-batches --skip-check --steps 30 $F 2>&1 | grep -E "decode B="
        done
      done
      for F in "--norm-warps 16 --router-shape 16,8" "--norm-warps 16" "--norm-warps 16 --router-shape 16,8" \
          "--norm-warps 16"; do
        echo "== olmoe-1b-7b [$F]"
        python scripts/bench_engine_gpu.py --out "$OUT/s13-router" --models olmoe-1b-7b --decode-batches 1 \
          --offline-batches --profile-batches --skip-check --steps 30 $F 2>&1 | grep -E "decode B="
      done
      for F in "" --no-gate-in-router "" --no-gate-in-router; do
        echo "== qwen1.5-moe-a2.7b gate-in-router above one row [$F]"
        python scripts/bench_engine_gpu.py --out "$OUT/s13-gate" --models qwen1.5-moe-a2.7b --decode-batches 1 64 \
          --offline-batches --profile-batches --skip-check --steps 30 $F 2>&1 | grep -E "decode B="
      done ;;
    moe-gaps)  # where an fp8 layer at M=1 sits idle between its kernels (v11 profile: 18.3 us busy, 21.8 us a call)
      python scripts/profile_moe_layer_gpu.py olmoe:1 qwen3:1 dsv2-lite:1 --pdl --calls 8 \
        --dtypes bf16 fp8_channel fp8_block 2>&1 | grep -v -i warn ;;
    s15)  # session 15's first call: bf16 cells in rounds after idle, the fp8 table twice, the engine on the retuned tables
      python scripts/bench_moe_gpu.py --no-check --rounds 3 --cooldown 1 2>&1 | grep -E "^shipped|^heuristic|^rounds|geomean|^[a-z0-9-]+ +[0-9]+ " | tail -70
      for t in 1 2; do  # was session 14's fp8_block slowdown the machine or the inputs? same command twice
        echo "== quant $t"
        OUT="$OUT/quant-$t" python scripts/bench_moe_gpu.py --quant --formats fp8_block,fp8_channel \
          --ms 1,1024,4096,16384 2>&1 | grep -E "^quant: [a-z0-9-]+ +[0-9]+ fp8|checks ok"
      done
      python scripts/bench_engine_gpu.py --out "$OUT/engine" --models olmoe-1b-7b --decode-batches 1 64 256 \
        --offline-batches 256 --profile-batches --skip-check --steps 30 2>&1 | grep -E "decode B=|offline B=" ;;
    s15b)  # one call for all of issue 4's open cells: bf16 in rounds, fp8_block merged against not, Mixtral's fp8 grouping
      mkdir -p "$OUT/bf16-rounds"
      OUT="$OUT/bf16-rounds" timeout 260 python scripts/bench_moe_gpu.py --no-check --rounds 3 --cooldown 1 2>&1 \
        | tee "$OUT/bf16-rounds/log.txt" | grep -E "^shipped|^heuristic|^rounds|geomean|^[a-z0-9-]+ +[0-9]+ " | tail -70
      flag_ab merge-gu merge 100 --formats fp8_block --ms 4096,16384
      timeout 80 python scripts/tune_engine_shapes_gpu.py --group-m-only --dtype fp8_channel mixtral:4096,16384 2>&1 \
        | grep -E "^tune|kept|changed|wrote" ;;
    s17)  # session 17: H100 tiles at M=1 (bf16 with the GEMV-or-tiles choice, fp8_channel), row-block groupings of
      # the fp8 tables at large M, then bf16 at M=1 in rounds and the fp8 cells of issue 4 on those tables
      timeout 90 python scripts/tune_engine_shapes_gpu.py --deadline 70 olmoe:1 qwen3:1 dsv2-lite:1 mixtral:1 2>&1 \
        | grep -E "^tune|kept|changed|wrote|deadline"
      timeout 110 python scripts/tune_engine_shapes_gpu.py --dtype fp8_channel --deadline 80 olmoe:1 qwen3:1 \
        dsv2-lite:1 2>&1 | grep -E "^tune|kept|changed|wrote|deadline"
      timeout 50 python scripts/tune_engine_shapes_gpu.py --group-m-only --dtype fp8_channel olmoe:4096,16384 \
        qwen3:4096,16384 dsv2-lite:4096,16384 2>&1 | grep -E "^tune|kept|changed|wrote"
      timeout 70 python scripts/tune_engine_shapes_gpu.py --group-m-only --dtype fp8_block mixtral:4096,16384 \
        olmoe:4096,16384 qwen3:4096,16384 dsv2-lite:4096,16384 2>&1 | grep -E "^tune|kept|changed|wrote"
      tar czf "$OUT/tables.tgz" moelab/kernels/configs
      mkdir -p "$OUT/bf16-m1" "$OUT/quant"
      OUT="$OUT/bf16-m1" timeout 40 python scripts/bench_moe_gpu.py --no-check --ms 1 --rounds 3 --cooldown 1 2>&1 \
        | tee "$OUT/bf16-m1/log.txt" | grep -E "^shipped|^heuristic|^rounds|geomean|^[a-z0-9-]+ +[0-9]+ "
      OUT="$OUT/quant" timeout 150 python scripts/bench_moe_gpu.py --quant --formats fp8_tensor,fp8_channel,fp8_block \
        --ms 1,4096,16384 2>&1 | tee "$OUT/quant/log.txt" | grep -E "^quant: [a-z0-9-]+ +[0-9]+ fp8|checks|rel err"
      flag_ab warp-spec-down ws-down 45 --formats fp8_block --ms 16384 ;;  # last: what the call's limit leaves
    s17b)  # the short form of s17 for what device time is left: the GEMV-or-tiles choice at M=1 (tuned, then bf16 at
      # M=1 in rounds), the fp8 groupings at large M and the fp8 cells there, the warp-specialized down last
      timeout 70 python scripts/tune_engine_shapes_gpu.py --deadline 50 qwen3:1 olmoe:1 dsv2-lite:1 mixtral:1 2>&1 \
        | grep -E "^tune|kept|changed|wrote|deadline"
      mkdir -p "$OUT/bf16-m1" "$OUT/quant"
      OUT="$OUT/bf16-m1" timeout 35 python scripts/bench_moe_gpu.py --no-check --ms 1 --rounds 3 --cooldown 1 2>&1 \
        | tee "$OUT/bf16-m1/log.txt" | grep -E "^shipped|^heuristic|^rounds|geomean|^[a-z0-9-]+ +[0-9]+ "
      timeout 40 python scripts/tune_engine_shapes_gpu.py --group-m-only --dtype fp8_channel olmoe:4096,16384 \
        qwen3:4096,16384 dsv2-lite:4096,16384 2>&1 | grep -E "^tune|kept|changed|wrote"
      timeout 50 python scripts/tune_engine_shapes_gpu.py --group-m-only --dtype fp8_block mixtral:4096,16384 \
        olmoe:4096,16384 qwen3:4096,16384 dsv2-lite:4096,16384 2>&1 | grep -E "^tune|kept|changed|wrote"
      tar czf "$OUT/tables.tgz" moelab/kernels/configs
      OUT="$OUT/quant" timeout 110 python scripts/bench_moe_gpu.py --quant --formats fp8_tensor,fp8_channel,fp8_block \
        --ms 4096,16384 2>&1 | tee "$OUT/quant/log.txt" | grep -E "^quant: [a-z0-9-]+ +[0-9]+ fp8|checks|rel err"
      flag_ab warp-spec-down ws-down 45 --formats fp8_block --ms 16384 ;;
    s17c)  # the least of s17: the GEMV-or-tiles choice at M=1 tuned, then bf16 at M=1 in rounds
      timeout 70 python scripts/tune_engine_shapes_gpu.py --deadline 50 qwen3:1 olmoe:1 dsv2-lite:1 mixtral:1 2>&1 \
        | grep -E "^tune|kept|changed|wrote|deadline"
      tar czf "$OUT/tables.tgz" moelab/kernels/configs
      mkdir -p "$OUT/bf16-m1"
      OUT="$OUT/bf16-m1" timeout 35 python scripts/bench_moe_gpu.py --no-check --ms 1 --rounds 3 --cooldown 1 2>&1 \
        | tee "$OUT/bf16-m1/log.txt" | grep -E "^shipped|^heuristic|^rounds|geomean|^[a-z0-9-]+ +[0-9]+ " ;;
    s15c)  # the short form of s15b for what device time is left: fp8_block merged or not, Mixtral's fp8 grouping
      flag_ab merge-gu merge 110 --formats fp8_block --ms 4096,16384
      timeout 70 python scripts/tune_engine_shapes_gpu.py --group-m-only --dtype fp8_channel mixtral:16384 2>&1 \
        | tee "$OUT/group-m.log" | grep -E "^tune|kept|changed|wrote" ;;
    s15d)  # the least of it: fp8_block merged or not at M=16384 on two shapes
      flag_ab merge-gu merge 90 --formats fp8_block --ms 16384 --shapes olmoe,mixtral ;;
    ws-down)  # the down GEMM warp-specialized by Triton (TMA tiles, 4 warps) or not: bf16 and fp8 at M >= 1024
      flag_ab warp-spec-down ws-down 200 --formats fp8_channel,fp8_block --ms 1024,4096,16384 ;;
    block-merge)  # fp8_block gate_up with gate and up as one dot operand, against two (same tables), M >= 4096
      flag_ab merge-gu merge 300 --formats fp8_block --ms 4096,16384 ;;
    group-m)  # row-block groupings of the tables in use at large M (fp8 first: Mixtral's 117 MB expert tiles)
      timeout 170 python scripts/tune_engine_shapes_gpu.py --group-m-only --dtype fp8_channel mixtral:1024,4096,16384 \
        olmoe:4096,16384 qwen3:4096,16384 dsv2-lite:4096,16384 2>&1 | grep -E "^tune|kept|changed|wrote"
      timeout 170 python scripts/tune_engine_shapes_gpu.py --group-m-only --dtype fp8_block mixtral:1024,4096,16384 \
        olmoe:4096,16384 qwen3:4096,16384 dsv2-lite:4096,16384 2>&1 | grep -E "^tune|kept|changed|wrote" ;;
    group-m-bf16)  # the same for the bf16 tables (this GPU's own, else its family's)
      timeout 200 python scripts/tune_engine_shapes_gpu.py --group-m-only mixtral:1024,4096,16384 \
        olmoe:1024,4096,16384 qwen3:1024,4096,16384 dsv2-lite:1024,4096,16384 2>&1 | grep -E "^tune|kept|changed|wrote" ;;
    quant-big)  # the fp8 formats at M >= 1024 on the tables as they are now
      python scripts/bench_moe_gpu.py --quant --formats fp8_channel,fp8_block --ms 1024,4096,16384 2>&1 \
        | grep -E "^quant: [a-z0-9-]+ +[0-9]+ |checks" ;;
    exposed)  # where a decode step's time goes with PDL on: each kernel's exposed time (OLMoE, B=1 and 64)
      python scripts/bench_engine_gpu.py --out "$OUT/exposed" --models olmoe-1b-7b --decode-batches 1 \
        --offline-batches --profile-batches 1 64 --skip-check --steps 30 2>&1 | grep -E "decode B=|profile|exposed" ;;
    grid-sync)  # is a persistent decode kernel worth it: a software grid barrier against a PDL kernel boundary
      timeout 300 python scripts/bench_grid_sync_gpu.py --phases 64 --phase-bytes 0 1e6 8e6 25e6 2>&1 | tail -5 ;;
    *) echo "unknown section $section; allowed: gpu-tests gpu-kernel-tests tune tune-fp8 engine kernels trace serve lab lab-qwen quant quant-ab moe-profile moe moe-gemv grid-sync mla-prep qwen-mix early-residual early-routing gate-in-router small-shapes s13-ab moe-gaps moe-profile-pdl exposed s15 s15b s15c s15d ws-down block-merge group-m group-m-bf16 quant-big" >&2 ;;
  esac
done
