#!/usr/bin/env bash
# The prepared GPU check of issue 14: build, device tests, compute-sanitizer,
# stream and bitwise-repeat checks, and the GPU benchmark, as ONE command that
# writes everything into OUTDIR (docs/gpu.md explains each step).
#
#   bash bench/gpu_check.sh OUTDIR [--tier correctness|bench|all] [--dry-run]
#                                  [--wheels DIR] [--budget SECONDS] [--bench-quick]
#
#   --tier correctness  build + device tests + sanitizer subset + stream/repeat/large checks
#   --tier bench        build + bench/bench_gpu.py (JSON and PNG)
#   --tier all          both (default)
#   --dry-run           everything but the GPU steps: arguments, environment, the
#                       test selections (collected, not run), the Python scripts'
#                       dry runs; runs on any machine
#   --wheels DIR        peer wheels (liger-kernel, cut-cross-entropy, ...) installed
#                       with --no-index before anything else (default: .whl if present)
#   --budget SECONDS    no step starts after this many seconds; each step's timeout is
#                       cut to what is left (default 570: the summary is written
#                       before a 600-second limit)
#   --bench-quick       bench_gpu.py --quick (small shapes; a smoke test)
#
# Environment: PYTHON (default python3), GPU_CHECK_CUDA_ARCH (default: the GPU's
# compute capability from nvidia-smi, e.g. 90-real; else 90-real).
# Files in OUTDIR (at most 8, for tools that bring back only a few): gpu_check.log
# (this transcript and the summary), build.log, tests.log, sanitizer.log,
# bench_gpu.log, bench_gpu.json, bench_gpu.png. Every step runs under `timeout`;
# the summary is written even when steps fail. Exit status: 0 when every
# correctness step passed (or, in a dry run, every selection was found), 1 otherwise,
# 2 for bad arguments.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; echo "usage: bash bench/gpu_check.sh OUTDIR [--tier correctness|bench|all] [--dry-run] [--wheels DIR] [--budget SECONDS] [--bench-quick]" >&2; exit 2; }

OUTDIR="" TIER=all DRY=0 WHEELS="" BUDGET=570 BENCH_QUICK=0
while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --tier) (($# >= 2)) || die "--tier needs a value"; TIER=$2; shift ;;
    --tier=*) TIER=${1#*=} ;;
    --wheels) (($# >= 2)) || die "--wheels needs a directory"; WHEELS=$2; shift ;;
    --wheels=*) WHEELS=${1#*=} ;;
    --budget) (($# >= 2)) || die "--budget needs a number of seconds"; BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --dry-run) DRY=1 ;;
    --bench-quick) BENCH_QUICK=1 ;;
    -*) die "unknown option $1" ;;
    *) [[ -z $OUTDIR ]] || die "one OUTDIR only (got '$OUTDIR' and '$1')"; OUTDIR=$1 ;;
  esac
  shift
done
[[ -n $OUTDIR ]] || die "OUTDIR is missing"
case $TIER in correctness|bench|all) ;; *) die "--tier must be correctness, bench or all, got '$TIER'" ;; esac
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || ((BUDGET < 60)); then
  die "--budget must be a whole number of seconds >= 60, got '$BUDGET'"
fi
if [[ -n $WHEELS && ! -d $WHEELS ]]; then die "--wheels: '$WHEELS' is not a directory"; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUTDIR" || die "cannot create OUTDIR '$OUTDIR'"
OUTDIR=$(cd "$OUTDIR" && pwd)
PY=${PYTHON:-python3}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
[[ -z $WHEELS && -d .whl ]] && WHEELS=.whl
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# ---- pytest selections (keywords, not test ids: tests/test_cuda.py keeps changing;
# "fakecupy" contains "cupy", so the real-CuPy cases are "not fakecupy")
K_DEVICE="not fakecupy"
K_SANITIZE="not fakecupy and (long_rows or strided or in_place or deferred or rank_ties or nan_stays or extreme or (decoding and 5000))"
K_DECODING="not fakecupy and decoding"
K_RACE="not fakecupy and (ce_long_rows or kl_long_rows or rank_ties or deferred or (decoding and 5000))"
K_STREAMS="not fakecupy and (stream or long_rows or deferred or in_place)"
K_LARGE="not fakecupy and (2_31 or 2_32 or huge)"
LOG_CAP=$((8 << 20))   # bytes of one step's output kept in its log file

NAMES=() STATES=() NOTES=() FATAL=0 BUILT=0

record() {  # name state note [fatal]
  NAMES+=("$1"); STATES+=("$2"); NOTES+=("$3")
  [[ ${4:-0} == 1 ]] && FATAL=1
  printf '  %-8s %s%s\n' "$2" "$1" "${3:+  ($3)}"
}

left() { echo $((DEADLINE - SECONDS)); }

# run NAME LIMIT LOGFILE cmd...: runs cmd under timeout (cut to the budget), its
# output into $TMP/NAME.out and appended (capped) to OUTDIR/LOGFILE. Sets RC and
# SPENT; RC=124 on a timeout, 125 when skipped for the budget.
run() {
  local name=$1 limit=$2 log=$3 t0
  shift 3
  local l; l=$(left)
  if ((l < 30)); then RC=125 SPENT=0; return; fi
  ((limit > l - 15)) && limit=$((l - 15))
  OUTF="$TMP/${name//[^A-Za-z0-9_.-]/_}.out"
  echo "==> $name (limit ${limit}s)"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUTF" 2>&1
  RC=$?
  ((RC == 137)) && RC=124
  SPENT=$((SECONDS - t0))
  { echo "===== $name: $* (rc $RC, ${SPENT}s)"; head -c "$LOG_CAP" "$OUTF"; echo; } >>"$OUTDIR/$log"
}

# step NAME LIMIT LOGFILE FATAL cmd...: run, then record PASS / FAIL / TIMEOUT;
# a failure shows the end of the output here.
step() {
  local name=$1 limit=$2 log=$3 fatal=$4
  shift 4
  run "$name" "$limit" "$log" "$@"
  case $RC in
    0) record "$name" PASS "${SPENT}s" ;;
    125) record "$name" SKIP "time budget" ;;
    124) record "$name" TIMEOUT "after ${SPENT}s; see $log" "$fatal"; tail -n 20 "$OUTF" | sed 's/^/      | /' ;;
    *) record "$name" FAIL "rc $RC, ${SPENT}s; see $log" "$fatal"; tail -n 25 "$OUTF" | sed 's/^/      | /' ;;
  esac
}

# ---- steps

environment() {
  echo "== environment"
  echo "date: $(date -u +%FT%TZ)   host: $(uname -srm)   cores: $(nproc 2>/dev/null)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
  else
    echo "GPU: nvidia-smi not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2 | tr '\n' ' ' | sed 's/^/nvcc: /'; echo; else echo "nvcc: not found"; fi
  if command -v compute-sanitizer >/dev/null; then compute-sanitizer --version 2>&1 | grep -m 1 -i version | sed 's/^/compute-sanitizer: /'; else echo "compute-sanitizer: not found"; fi
  timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for dist in ("numpy", "ml_dtypes", "cupy-cuda13x", "cupy-cuda12x", "torch", "triton", "pytest",
             "pytest-timeout", "scikit-build-core", "pybind11", "cmake", "ninja", "matplotlib",
             "liger-kernel", "cut-cross-entropy", "quack-kernels", "flashinfer-python"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        pass
try:
    import cupy
    rt, drv = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
    print(f"  CuPy {cupy.__version__}: CUDA runtime {rt}, driver supports CUDA {drv}, "
          f"{cupy.cuda.runtime.getDeviceCount()} GPU(s)")
except Exception as e:
    print(f"  CuPy: unusable here ({type(e).__name__}: {e})")
try:
    import torch
    print(f"  torch {torch.__version__}: CUDA {torch.version.cuda}, available "
          f"{torch.cuda.is_available()}")
except Exception as e:
    print(f"  torch: unusable here ({type(e).__name__}: {e})")
EOF
}

install_wheels() {
  if [[ -z $WHEELS ]]; then
    echo "  peer wheels: none (no --wheels and no .whl folder): peers not installed here are skipped"
    return
  fi
  local files=("$WHEELS"/*.whl)
  if [[ ! -e ${files[0]} ]]; then
    echo "  peer wheels: $WHEELS holds no .whl files"
    return
  fi
  echo "  peer wheels in $WHEELS: ${files[*]##*/}"
  if ((DRY)); then
    record "peer wheels" DRY "would install ${#files[@]} wheel(s) with --no-index into a private target"
    return
  fi
  step "peer wheels" 120 build.log 0 "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$TMP/site" "${files[@]}"
  ((RC == 0)) && export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
}

peers_report() {
  timeout 120 "$PY" - <<'EOF' 2>&1
import importlib, importlib.util
def have(mod, attr=None):
    if importlib.util.find_spec(mod.split(".")[0]) is None:
        return "skipped: not installed (bring its wheel: docs/gpu.md)"
    try:
        m = importlib.import_module(mod)
        return "available" + (f" ({attr} {getattr(m, attr)})" if attr and hasattr(m, attr) else "")
    except Exception as e:  # a broken install is a skip with its reason
        return f"skipped: import fails: {type(e).__name__}: {str(e)[:160]}"
print("  peer torch:", have("torch", "__version__"))
print("  peer torch.compile (triton):", have("triton", "__version__"))
try:
    import torch.nn.functional as F
    print("  peer torch F.linear_cross_entropy:",
          "available" if hasattr(F, "linear_cross_entropy") else "skipped: not in this torch")
except Exception as e:
    print(f"  peer torch F.linear_cross_entropy: skipped: {e}")
print("  peer liger-kernel:", have("liger_kernel.transformers"))
print("  peer cut-cross-entropy:", have("cut_cross_entropy"))
print("  peer quack:", have("quack"))
print("  peer flashinfer (sampling, bench/gpu_checks.py decoding):", have("flashinfer.sampling"))
EOF
}

cuda_arch() {
  local cc
  [[ -n ${GPU_CHECK_CUDA_ARCH:-} ]] && { echo "$GPU_CHECK_CUDA_ARCH"; return; }
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  [[ $cc =~ ^[0-9]+$ ]] && echo "${cc}-real" || echo "90-real"
}

build() {
  local arch; arch=$(cuda_arch)
  local cmd=("$PY" -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir .)
  if ((DRY)); then
    record "build" DRY "CUDAARCHS=$arch CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=$arch ${cmd[*]}"
    return
  fi
  step "build (sm $arch)" 300 build.log 1 env CUDAARCHS="$arch" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$arch ${CMAKE_ARGS:-}" "${cmd[@]}"
  ((RC == 0)) || return
  # from another directory: the installed package, not the source tree
  cd "$TMP" || return
  step "import lmxent._cuda + CuPy smoke" 90 build.log 1 "$PY" -c '
import cupy, numpy as np, lmxent as lx
from lmxent import _cuda
x = cupy.random.standard_normal((64, 5000), dtype=cupy.float32)
err = float(np.abs(lx.logsumexp(x).get() - lx.logsumexp(x.get())).max())
print("lmxent", lx.__version__, "from", lx.__file__, "- logsumexp on CuPy vs CPU:", err)
assert err < 1e-4, err'
  cd "$ROOT" || return
  [[ ${STATES[-1]} == PASS ]] && BUILT=1
}

# counts NAME EXPR [NAME EXPR ...]: dry run: how many tests of tests/test_cuda.py each
# selection collects (the collections run in parallel); an empty one fails, except
# for names marked with a leading '?'
counts() {
  local i=0 args=("$@") name n
  while ((i < ${#args[@]})); do
    (cd "$ROOT" && timeout 120 "$PY" -m pytest -p no:cacheprovider --collect-only -q \
       tests/test_cuda.py -k "${args[i + 1]}" >"$TMP/count_$i.out" 2>&1) &
    i=$((i + 2))
  done
  wait
  i=0
  while ((i < ${#args[@]})); do
    name=${args[i]}
    n=$(grep -c '::' "$TMP/count_$i.out")
    if [[ $name == \?* ]]; then
      record "${name#\?}" DRY "selects $n tests: -k \"${args[i + 1]}\" (none is fine: bench/gpu_checks.py large covers it)"
    elif ((n > 0)); then
      record "$name" DRY "selects $n tests: -k \"${args[i + 1]}\""
    else
      record "$name" FAIL "selection is empty: -k \"${args[i + 1]}\"" 1
      tail -n 5 "$TMP/count_$i.out" | sed 's/^/      | /'
    fi
    i=$((i + 2))
  done
}

# device_skips LABEL: after a pytest step, a FAIL if its real-CuPy cases skipped for
# want of CuPy, a GPU or the CUDA build (a run of skips must not read as a pass)
device_skips() {
  local why
  why=$(grep -m 1 -oE 'SKIPPED .*(CuPy unusable|no GPU|without the CUDA backend).*' "$OUTF")
  [[ -n $why ]] && record "$1" FAIL "device cases skipped: ${why:0:140}" 1
}

pytest_cmd() {
  PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs --tb=short)
  "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=150)
}

sanitize() {
  local tool rc out n
  if ! command -v compute-sanitizer >/dev/null; then
    record "compute-sanitizer" SKIP "not found on PATH"; return
  fi
  run "sanitizer probe" 120 sanitizer.log compute-sanitizer --tool memcheck "$PY" -c \
    'import cupy; print("probe:", int(cupy.arange(4).sum()))'
  if grep -qiE 'not supported|error 999|unable to|failed to initialize' "$OUTF" || ((RC != 0)); then
    record "compute-sanitizer" UNAVAILABLE "refuses this device or fails (rc $RC): $(grep -iE 'not supported|error|unable|fail' "$OUTF" | head -n 1 | cut -c1-120)"
    return
  fi
  local l; l=$(left)
  local limit=$((l - 15 < 200 ? l - 15 : 200))
  if ((limit < 30)); then record "compute-sanitizer" SKIP "time budget"; return; fi
  echo "==> compute-sanitizer memcheck, racecheck, synccheck in parallel (limit ${limit}s)"
  for tool in memcheck racecheck synccheck; do
    local k=$K_SANITIZE
    [[ $tool != memcheck ]] && k=$K_RACE
    (cd "$ROOT" && timeout -k 10 "$limit" compute-sanitizer --tool "$tool" --error-exitcode 86 \
       --print-limit 50 --target-processes all "${PYTEST[@]}" tests/test_cuda.py -k "$k" \
       >"$TMP/san_$tool.out" 2>&1; echo $? >"$TMP/san_$tool.rc") &
  done
  wait
  for tool in memcheck racecheck synccheck; do
    rc=$(cat "$TMP/san_$tool.rc" 2>/dev/null || echo 124)
    out="$TMP/san_$tool.out"
    { echo "===== compute-sanitizer $tool (rc $rc)"; head -c "$LOG_CAP" "$out"; echo; } >>"$OUTDIR/sanitizer.log"
    n=$(grep -oE 'ERROR SUMMARY: [0-9]+' "$out" | tail -n 1 | grep -oE '[0-9]+$')
    local tests; tests=$(grep -E '(passed|failed|skipped|error|no tests ran).* in [0-9.]+s' "$out" | tail -n 1 | tr -d '=')
    if grep -qiE 'device not supported|error 999' "$out"; then
      record "sanitizer $tool" UNAVAILABLE "refuses the device"
    elif [[ $rc == 124 || $rc == 137 ]]; then
      record "sanitizer $tool" TIMEOUT "after ${limit}s: ${tests}" 1
    elif grep -qE 'SKIPPED .*(CuPy unusable|no GPU|without the CUDA backend)' "$out"; then
      record "sanitizer $tool" FAIL "its device cases skipped: $tests" 1
    elif [[ $rc == 0 && ${n:-0} == 0 ]]; then
      record "sanitizer $tool" PASS "0 findings; $tests"
    else
      record "sanitizer $tool" FAIL "rc $rc, ${n:-?} findings; $tests; see sanitizer.log" 1
      grep -m 12 -E '^=========|FAILED' "$out" | sed 's/^/      | /'
    fi
  done
}

correctness() {
  echo "== correctness tier"
  pytest_cmd
  if ((DRY)); then
    counts "device tests" "$K_DEVICE" "sanitizer subset (memcheck)" "$K_SANITIZE" \
      "sanitizer subset (racecheck, synccheck)" "$K_RACE" "stream tests" "$K_STREAMS" \
      "decoding device tests (in the device tests)" "$K_DECODING" \
      "?> 2^31 elements (tests/test_cuda.py)" "$K_LARGE"
    step "gpu_checks.py dry run" 60 tests.log 1 "$PY" bench/gpu_checks.py --dry-run repeat large decoding
    sed 's/^/      /' "$OUTF"
    return
  fi
  ((BUILT)) || { record "correctness tier" SKIP "no working build"; FATAL=1; return; }
  step "device tests (tests/test_cuda.py, real CuPy)" 240 tests.log 1 "${PYTEST[@]}" tests/test_cuda.py -k "$K_DEVICE"
  grep -E 'passed|failed|skipped' "$OUTF" | tail -n 1 | sed 's/^/      /'
  grep -E '^SKIPPED' "$OUTF" | head -n 5 | sed 's/^/      /'
  device_skips "device tests: real CuPy cases ran"
  run "> 2^31 elements (tests/test_cuda.py)" 120 tests.log "${PYTEST[@]}" tests/test_cuda.py -k "$K_LARGE"
  case $RC in
    0) record "> 2^31 elements (tests/test_cuda.py)" PASS "${SPENT}s" ;;
    5) record "> 2^31 elements (tests/test_cuda.py)" NONE "no such test there" ;;
    125) record "> 2^31 elements (tests/test_cuda.py)" SKIP "time budget" ;;
    *) record "> 2^31 elements (tests/test_cuda.py)" FAIL "rc $RC; see tests.log" 1; tail -n 15 "$OUTF" | sed 's/^/      | /' ;;
  esac
  step "> 2^31 elements (bench/gpu_checks.py large)" 120 tests.log 1 "$PY" bench/gpu_checks.py large
  step "streams: CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1" 150 tests.log 1 \
    env CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 "${PYTEST[@]}" tests/test_cuda.py -k "$K_STREAMS"
  device_skips "streams: real CuPy cases ran"
  step "bitwise repeat / in place / non-blocking stream" 120 tests.log 1 "$PY" bench/gpu_checks.py repeat
  step "decoding: CuPy vs CPU, repeat; times vs torch, FlashInfer (bench/gpu_checks.py decoding)" 120 \
    tests.log 1 "$PY" bench/gpu_checks.py decoding
  grep -E 'ms  \(|skipped' "$OUTF" | sed 's/^/      /'
  step "bitwise repeat, per-thread default stream" 120 tests.log 1 \
    env CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 "$PY" bench/gpu_checks.py repeat
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    step "torch adapter, CUDA tensors (tests/test_torch.py)" 180 tests.log 1 \
      "${PYTEST[@]}" tests/test_torch.py -k cuda_tensors
  else
    record "torch adapter, CUDA tensors" SKIP "no CUDA build of torch on this machine"
  fi
  sanitize
}

bench() {
  echo "== bench tier"
  local extra=()
  ((BENCH_QUICK)) && extra+=(--quick)
  if ((DRY)); then
    step "bench_gpu.py dry run" 120 bench_gpu.log 1 "$PY" bench/bench_gpu.py --dry-run --out "$OUTDIR" "${extra[@]}"
    sed 's/^/      /' "$OUTF"
    return
  fi
  ((BUILT)) || { record "bench tier" SKIP "no working build"; return; }
  local l; l=$(left)
  local limit=$((l - 15 < 210 ? l - 15 : 210))
  # the script stops starting cases 40 s before its limit, so it writes its JSON itself
  step "GPU benchmark (bench/bench_gpu.py)" "$limit" bench_gpu.log 1 "$PY" bench/bench_gpu.py \
    --out "$OUTDIR" --budget $((limit > 80 ? limit - 40 : 40)) "${extra[@]}"
  sed -n '/==== bench_gpu summary ====/,$p' "$OUTF"
}

main() {
  DEADLINE=$((SECONDS + BUDGET))
  echo "gpu_check.sh: tier $TIER$( ((DRY)) && echo ', dry run'), budget ${BUDGET}s, output in $OUTDIR"
  echo "repository $ROOT ($(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null | cut -c1-70))"
  environment
  echo "== setup"
  install_wheels
  peers_report
  build
  [[ $TIER == correctness || $TIER == all ]] && correctness
  [[ $TIER == bench || $TIER == all ]] && bench
  echo
  echo "==== summary ($(date -u +%T), ${SECONDS}s; logs in $OUTDIR) ===="
  local i
  for i in "${!NAMES[@]}"; do
    printf '%-11s %s%s\n' "${STATES[i]}" "${NAMES[i]}" "${NOTES[i]:+  (${NOTES[i]})}"
  done
  if ((FATAL)); then echo "RESULT: FAILED"; return 1; fi
  echo "RESULT: OK"
}

: >"$OUTDIR/gpu_check.log"
main 2>&1 | tee -a "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
