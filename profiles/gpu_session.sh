#!/usr/bin/env bash
# The ONE device command of a session lent an H100/H200:
#
#     bash profiles/gpu_session.sh                  # on the GPU machine (the device tool's run), results in $OUT
#     bash profiles/gpu_session.sh --cpu-smoke      # here: every size shrunk, the whole script end to end on the CPU
#                                                   # (or LEWM_GPU_SESSION_SMOKE=1)
#
# Steps, each under its own `timeout`, all inside a 540 s budget (LEWM_GPU_SESSION_BUDGET): a step gets
# min(its own limit, what is left of the budget); a step that fails or times out is recorded and the
# session goes on.
#   1. install the project offline over the image's torch/triton (pip --no-deps --no-build-isolation -e .)
#   2. versions: python, torch, triton, CUDA, GPU name and driver
#   3. the GPU tests: pytest -m gpu -q on the test files that carry the gpu mark
#   4. bench/planning_latency.py: 1 env and --envs 50, fp32 and bf16 (paper CEM 300 x 30 x 30, H 5;
#      no DINO-WM-cost planner unless LEWM_GPU_SESSION_DINOWM=1: one of its plans takes ~30 s)
#   5. SIGReg fwd+bwd timing: pytest bench/test_perf_model.py -k sigreg --benchmark-only (eager vs fused)
#   6. bench/train_throughput.py at a reduced step count (eager; compile + CUDA graphs only with
#      LEWM_GPU_SESSION_COMPILE=1: compiling the step takes minutes)
#   7. bench/gpu_model.py with the planning CSV just written: modelled beside measured, the model's error
# Result files in $OUT (default ./gpu_out), 6 in all: session.log, summary.json, planning_latency.csv,
# sigreg_bench.json, train_throughput.csv, gpu_model.csv.
# Nothing here imports the simulators (gymnasium, mujoco, ...), which the GPU machine lacks.
set -u
cd "$(dirname "$0")/.."

SMOKE=${LEWM_GPU_SESSION_SMOKE:-0}
for a in "$@"; do
  case "$a" in
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) sed -n 2,24p "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $a (known: --cpu-smoke)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${LEWM_GPU_SESSION_BUDGET:-540}
export PYTHONUNBUFFERED=1
export LEWM_COMMIT=${LEWM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
LOG="$OUT/session.log"
SUMMARY="$OUT/summary.tsv.tmp"
: >"$LOG"
: >"$SUMMARY"
T0=$(date +%s)

log() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD under timeout min(LIMIT_S, budget left - 2), output to the log
step() {
  local name=$1 limit=$2
  shift 2
  local now left t rc s0
  now=$(date +%s)
  left=$((BUDGET - (now - T0) - 2))
  t=$limit
  if [ "$left" -lt "$t" ]; then t=$left; fi
  if [ "$t" -lt 5 ]; then
    log "=== $name: SKIPPED (budget of ${BUDGET} s spent)"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$limit" >>"$SUMMARY"
    return 0
  fi
  log "=== $name (timeout ${t} s): $*"
  s0=$(date +%s)
  set -o pipefail
  timeout --kill-after=5 "$t" "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  set +o pipefail
  local dt=$(( $(date +%s) - s0 ))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    log "=== $name: TIMED OUT after ${dt} s"
  else
    log "=== $name: exit ${rc} after ${dt} s"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$t" >>"$SUMMARY"
  return 0
}

if [ "$SMOKE" = "1" ]; then
  MODE="cpu-smoke"
  DEV=(--device cpu)
  PLAN_SIZE=(--quick --threads 1 --repeats 2)
  PLAN_50=(--envs 2)
  TRAIN=(--device cpu --quick --no-compile --threads 1 --workers 0 --windows 2)
  MODEL=(--preset tiny --samples 16 --elites 4 --iterations 2 --configs 1env-bf16 --mma dtype)
  SIGREG_ENV=(env LEWM_BENCH_THREADS=1)
else
  MODE="gpu"
  DEV=(--device cuda)
  PLAN_SIZE=(--repeats 5)
  PLAN_50=(--envs 50 --repeats 3)
  TRAIN=(--device cuda --steps 5 --windows 3 --warmup 2 --workers 2 --episodes 40)
  [ "${LEWM_GPU_SESSION_COMPILE:-0}" = "1" ] || TRAIN+=(--no-compile)
  MODEL=(--mma report)  # MMA classes from profiles/kernels_sm90.csv (no sm_90 compile inside the budget)
  SIGREG_ENV=(env)
fi
DINOWM=(--no-dinowm)
[ "${LEWM_GPU_SESSION_DINOWM:-0}" = "1" ] && DINOWM=(--dinowm-repeats 1)

log "gpu_session.sh: mode ${MODE}, budget ${BUDGET} s, commit ${LEWM_COMMIT}, out ${OUT}, $(date -u +%FT%TZ)"

# 1. install (offline, over the image's torch / triton); the smoke run keeps this machine's install
if [ "$SMOKE" != "1" ] || [ "${LEWM_GPU_SESSION_INSTALL:-0}" = "1" ]; then
  step install 90 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
else
  log "=== install: skipped in cpu-smoke mode (LEWM_GPU_SESSION_INSTALL=1 forces it)"
fi

# 2. versions
step versions 20 "$PY" - <<'EOF'
import json, platform, shutil, subprocess
import torch, triton
v = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
     "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    v.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
             capability=f"{p.major}.{p.minor}")
if shutil.which("nvidia-smi"):
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                       capture_output=True, text=True)
    v["nvidia_smi"] = r.stdout.strip()
import lewm, lewm_kernels
v["lewm"] = lewm.__file__
print("VERSIONS " + json.dumps(v))
EOF

# 3. GPU tests (only the files that carry the gpu mark: nothing else is collected)
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py 2>/dev/null)
if [ "${#GPU_TESTS[@]}" -gt 0 ]; then
  step gpu_tests 100 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${GPU_TESTS[@]}"
fi

# 4. planning latency
PL=(bench/planning_latency.py "${DEV[@]}" --no-dinowm --csv "$OUT/planning_latency.csv")
step plan_1env_fp32 90 "$PY" bench/planning_latency.py "${DEV[@]}" "${PLAN_SIZE[@]}" "${DINOWM[@]}" \
  --csv "$OUT/planning_latency.csv"
step plan_1env_bf16 60 "$PY" "${PL[@]}" "${PLAN_SIZE[@]}" --dtype bfloat16
step plan_50env_fp32 60 "$PY" "${PL[@]}" "${PLAN_SIZE[@]}" "${PLAN_50[@]}"
step plan_50env_bf16 50 "$PY" "${PL[@]}" "${PLAN_SIZE[@]}" "${PLAN_50[@]}" --dtype bfloat16

# 5. SIGReg fwd+bwd, eager vs fused
step sigreg_fwd_bwd 40 "${SIGREG_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider bench/test_perf_model.py -k sigreg \
  --benchmark-only --benchmark-json="$OUT/sigreg_bench.json"

# 6. training throughput, reduced
step train_throughput 60 "$PY" bench/train_throughput.py "${TRAIN[@]}" --csv "$OUT/train_throughput.csv"

# 7. the cost model beside what was just measured
step gpu_model 60 "$PY" bench/gpu_model.py "${MODEL[@]}" --measured "$OUT/planning_latency.csv" \
  --csv "$OUT/gpu_model.csv"

# summary: one JSON file, and a short table last (the device tool's reply carries the output's end)
TOTAL=$(( $(date +%s) - T0 ))
"$PY" - "$SUMMARY" "$OUT/summary.json" "$MODE" "$TOTAL" "$BUDGET" <<'EOF' | tee -a "$LOG"
import json, sys
src, dst, mode, total, budget = sys.argv[1:]
steps = []
for line in open(src):
    name, rc, secs, limit = line.rstrip("\n").split("\t")
    steps.append({"step": name, "rc": rc, "seconds": int(secs), "timeout": int(limit),
                  "status": "ok" if rc == "0" else ("timeout" if rc in ("124", "137") else
                                                    ("skipped" if rc == "skipped" else "failed"))})
json.dump({"mode": mode, "total_seconds": int(total), "budget_seconds": int(budget), "steps": steps},
          open(dst, "w"), indent=1)
print(f"SUMMARY ({mode}, {total} s of {budget} s)")
for s in steps:
    print(f"  {s['step']:<18} {s['status']:<8} {s['seconds']:>4} s (limit {s['timeout']} s)")
EOF
rm -f "$SUMMARY"
grep -h "^RATIOS\|^check\|^  H100\|^H100 (modelled)\|^H200 (modelled)" "$LOG" | tail -n 40
exit 0
