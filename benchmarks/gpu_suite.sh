#!/usr/bin/env bash
# The GPU suite: build fastvision, run the GPU tests and the quick benchmarks, write everything to OUTDIR.
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Files (at most 8, what the device tool returns): env.txt, build.log, gpu_tests.log, bench.log,
# micro/micro.json, micro/micro.png, models/models.json, and suite.json, which holds the other
# benchmarks' JSON (host_overhead, host_breakdown, host_step, resnet, dino_step, dino_step_s8, verify) under their names.
# Nsight Compute's report (step ncu) goes into bench.log, its key lines to the output.
# Steps run in the order below (most informative first), each under `timeout`; a failing step does
# not stop the next.
#
# Environment:
#   SUITE_STEPS       comma-separated steps to run, in this order (default env,build,new-tests,dino,micro,dino-s8,
#                     ncu,conv-tests,host,resnet,models,tests,verify), e.g. SUITE_STEPS=env,build,new-tests,dino,micro
#   PROBE_ARGS        arguments of benchmarks.kernel_probe in the ncu step (default: every workload), e.g.
#                     "--ops add_layer_norm"; NCU: the ncu binary (default: found on PATH or under /usr/local/cuda)
#   NEW_TESTS         test files of the new-tests step: code not yet run on a GPU that the benchmarks after it
#                     rely on (default: the DDP graph step's parameter aliases, ops.linear on the default
#                     CUDA stream, the attention launch choice's lookup, LayerNorm at width 1, then the files the
#                     last run's time limit cut short; see results/h100/NOTES.md)
#   NEW_TESTS_SECONDS time limit of the new-tests step (default 200)
#   GPU_TEST_SECONDS  time limit of the GPU test run (default 150)
#   GPU_TEST_WORKERS  pytest-xdist processes for both test steps where xdist is installed (default 8; 0: one
#                     process). Compiling each test's kernels is most of a GPU test's time, and it is CPU work
#   GPU_TESTS         test paths in the order to run them (default: tests)
#   MICRO_SECONDS     --max-seconds of the micro benchmark (default 120)
#   MICRO_ARGS        its other arguments (default --quick), e.g. "--quick --compile none --ops layer_norm,softmax"
#   MODELS_SECONDS    --max-seconds of the model benchmark (default 170)
#   MODELS_VARIANTS   its variants (default eager,patch,eager+graph,patch+graph,compile,patch+compile: the
#                     CUDA-graph ones show device time without the host's launch cost)
#   DINO_ARGS         arguments of the DINO step benchmark (default: batch 64; eager, fastvision+packing+graph,
#                     compile, compile+graph, fastvision+packing+graph+recompute, fastvision+graph,
#                     fastvision+packing)
#   DINO_SECONDS      --max-seconds of the DINO step benchmark (default 150)
#   DINO_S8_ARGS      the same for ViT-S/8 (default: batch 64; eager, fastvision+packing+graph, compile,
#                     fastvision+packing+graph+recompute, fastvision+graph)
#   PYTHON            interpreter (default: python3, else python)
set -u

OUT="${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python3 || command -v python)}"
STEPS=",${SUITE_STEPS:-env,build,new-tests,dino,micro,dino-s8,ncu,conv-tests,host,resnet,models,tests,verify},"
NEW_TESTS="${NEW_TESTS:-tests/test_dino_cuda_graph.py tests/test_linear.py tests/test_attention.py tests/test_layer_norm.py
  tests/test_patch_vit.py tests/test_packed_multicrop.py tests/test_gelu.py tests/test_partial_sum.py}"
GPU_TEST_SECONDS="${GPU_TEST_SECONDS:-150}"
GPU_TEST_WORKERS="${GPU_TEST_WORKERS:-8}"
MICRO_SECONDS="${MICRO_SECONDS:-120}"
MICRO_ARGS="${MICRO_ARGS:---quick}"
MODELS_SECONDS="${MODELS_SECONDS:-170}"
MODELS_VARIANTS="${MODELS_VARIANTS:-eager,patch,eager+graph,patch+graph,compile,patch+compile}"
DINO_ARGS="${DINO_ARGS:---batch 64 --variants eager,fastvision+packing+graph,compile,compile+graph,fastvision+packing+graph+recompute,fastvision+graph,fastvision+packing}"
DINO_S8_ARGS="${DINO_S8_ARGS:---arch vit_small_patch8_224 --batch 64 --variants eager,fastvision+packing+graph,compile,fastvision+packing+graph+recompute,fastvision+graph}"
# FASTVISION_REPORT_FAILURES: tests/conftest.py prints each failure when it happens (time limits cut the summary)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 FASTVISION_REPORT_FAILURES=1
export FASTVISION_COMMIT="${FASTVISION_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

SUMMARY=()
SUITE_START=$(date +%s)

wants() { [[ "$STEPS" == *",$1,"* ]]; }

report_tests() {  # report_tests STEP: the step's passed / failed counts and failures, from its part of gpu_tests.log
  local part
  part="$(awk -v head="== $1 " 'index($0, "== ") == 1 { on = index($0, head) == 1; if (on) text = "" }
    on { text = text $0 "\n" } END { printf "%s", text }' \
    "$OUT/gpu_tests.log")"
  echo "   $1: $(grep -c ' PASSED' <<<"$part") passed, $(grep -c ' FAILED' <<<"$part") failed," \
    "$(grep -c ' SKIPPED' <<<"$part") skipped; last line: $(tail -1 <<<"$part")"
  grep -E '^(FAILED|ERROR) ' <<<"$part" | sort -u | head -20 | sed 's/^/   /'
}

test_args() {  # pytest arguments of the GPU test steps: one line per test (what a timeout leaves), in parallel
  local args=(-m gpu -v -rfE -p no:cacheprovider -o faulthandler_timeout=60)
  if [ "$GPU_TEST_WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    args+=(-n "$GPU_TEST_WORKERS")
  fi
  "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout 120)
  printf '%s\n' "${args[@]}"
}

record() {  # record STEP RC SECONDS [NOTE]
  local state="ok"
  [ "$2" -eq 124 ] && state="TIMEOUT"
  [ "$2" -ne 0 ] && [ "$2" -ne 124 ] && state="FAILED (rc $2)"
  SUMMARY+=("$(printf '%-13s %-14s %4ss  %s' "$1" "$state" "$3" "${4:-}")")
}

run_step() {  # run_step NAME LIMIT_SECONDS LOGFILE COMMAND...
  local name="$1" limit="$2" log="$3"; shift 3
  local start rc
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  record "$name" "$rc" "$(( $(date +%s) - start ))" "$(basename "$log")"
  return "$rc"
}

if wants env; then
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $FASTVISION_COMMIT"
    echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) ($(nproc) CPUs)"
    timeout 30 nvidia-smi || echo "nvidia-smi failed"
    timeout 30 nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu --format=csv
    "$PY" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB", "L2", getattr(p, "L2_cache_size", "?"))
for name in ("triton", "timm", "torchvision", "matplotlib", "tqdm", "pytest", "pytest_timeout"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
PY
    command -v nvcc >/dev/null && nvcc --version | tail -2
  } >"$OUT/env.txt" 2>&1
  record env 0 0 env.txt
fi

if wants build; then
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
  if ! run_step build 300 "$OUT/build.log" "$PY" -m pip install -e . --no-deps --no-build-isolation; then
    FASTVISION_SKIP_EXTENSION=1 run_step build-py 180 "$OUT/build.log" \
      "$PY" -m pip install -e . --no-deps --no-build-isolation
  fi
  "$PY" -c "import fastvision, fastvision.ops; print('fastvision', fastvision.__version__, 'imports')" \
    >>"$OUT/build.log" 2>&1
fi


if wants new-tests; then  # what changed since the last GPU run, before the benchmarks that rely on it
  # shellcheck disable=SC2086
  mapfile -t args < <(test_args)
  run_step new-tests "${NEW_TESTS_SECONDS:-200}" "$OUT/gpu_tests.log" "$PY" -m pytest $NEW_TESTS "${args[@]}"
  report_tests new-tests
fi

if wants dino; then  # the DINO step, issue 7's configuration
  # shellcheck disable=SC2086
  run_step dino_step $(( ${DINO_SECONDS:-150} + 70 )) "$OUT/bench.log" "$PY" -m benchmarks.dino_step --quick ${DINO_ARGS} \
    --max-seconds "${DINO_SECONDS:-150}" \
    --out "$OUT/dino_step.json"
fi

if wants micro; then
  # shellcheck disable=SC2086
  run_step micro $(( MICRO_SECONDS + 90 )) "$OUT/bench.log" \
    "$PY" -m benchmarks.micro ${MICRO_ARGS} --out "$OUT/micro" --max-seconds "$MICRO_SECONDS"
fi

if wants dino-s8; then  # the same step on ViT-S/8 (785 + 145 tokens per crop), which issue 7 also asks for
  # shellcheck disable=SC2086
  run_step dino_step_s8 240 "$OUT/bench.log" "$PY" -m benchmarks.dino_step --quick ${DINO_S8_ARGS} \
    --max-seconds 170 --out "$OUT/dino_step_s8.json"
fi

if wants ncu; then  # Nsight Compute on fastvision's kernels at the DINO step's shapes (benchmarks/kernel_probe.py)
  NCU="${NCU:-$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}"
  if [ -n "$NCU" ]; then
    run_step ncu 240 "$OUT/ncu.tmp" "$NCU" --clock-control none --profile-from-start off \
      -k 'regex:layer_norm|attention|gelu|sum_partials' --section SpeedOfLight --section LaunchStats \
      --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
      "$PY" -m benchmarks.kernel_probe ${PROBE_ARGS:-}
    grep -E '^  [a-z_]+kernel|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall' \
      "$OUT/ncu.tmp" | sed 's/^/   ncu: /' | head -120
    cat "$OUT/ncu.tmp" >>"$OUT/bench.log" && rm -f "$OUT/ncu.tmp"
  else
    record ncu 1 0 "no ncu found"
  fi
fi

if wants conv-tests; then  # the CUDA conv/BN kernels and patched ResNets: a short run of their own
  run_step conv-tests 90 "$OUT/gpu_tests.log" "$PY" -m pytest tests/test_conv_bn_act.py tests/test_fold_batchnorm.py \
    tests/test_patch_resnet.py -m gpu -q -p no:cacheprovider -o faulthandler_timeout=30
  tail -1 "$OUT/gpu_tests.log" | sed 's/^/   conv-tests: /'
fi

if wants host; then  # host time per fused call vs eager (what limited the patched models on 2026-11-26)
  run_step host 120 "$OUT/bench.log" "$PY" -m benchmarks.host_overhead --out "$OUT/host_overhead.json"
  run_step host-layers 90 "$OUT/bench.log" "$PY" -m benchmarks.host_breakdown --out "$OUT/host_breakdown.json"
  run_step host-step 120 "$OUT/bench.log" "$PY" -m benchmarks.host_step --batch 32 --out "$OUT/host_step.json"
fi


if wants resnet; then  # ResNet-50 inference and conv_bn_act layers
  run_step resnet_bench 120 "$OUT/bench.log" "$PY" -m benchmarks.resnet_bench --quick --out "$OUT/resnet.json"
fi

if wants models; then
  run_step models $(( MODELS_SECONDS + 60 )) "$OUT/bench.log" \
    "$PY" -m benchmarks.models --quick --out "$OUT/models" --max-seconds "$MODELS_SECONDS" \
    --variants "$MODELS_VARIANTS"
fi



if wants tests; then
  mapfile -t args < <(test_args)
  # shellcheck disable=SC2086
  run_step tests "$GPU_TEST_SECONDS" "$OUT/gpu_tests.log" "$PY" -m pytest ${GPU_TESTS:-tests} --maxfail=20 "${args[@]}"
  report_tests tests
fi

if wants verify; then  # fastvision.verify on full-size ViT-S/16 and ViT-B/16 in bf16 on the GPU
  run_step verify 120 "$OUT/bench.log" "$PY" -m benchmarks.verify_models --out "$OUT/verify.json"
fi

echo
echo "== summary ($(( $(date +%s) - SUITE_START ))s, outputs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
"$PY" -m benchmarks.summary "$OUT" 2>&1 | cut -c1-220
"$PY" - "$OUT" <<'PY'  # the top-level JSON files into one suite.json (the 8-file limit)
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
files = sorted(p for p in out.glob("*.json") if p.name != "suite.json")
if files:
    bundle = {p.stem: json.loads(p.read_text()) for p in files}
    (out / "suite.json").write_text(json.dumps(bundle, indent=1))
    for p in files:
        p.unlink()
    print("suite.json:", ", ".join(bundle))
PY
