#!/usr/bin/env bash
# One GPU session in one command, phases in order of value, each under its own time limit (together 9 minutes, so
# one 10-minute device call holds them all) and each adding its results to $OUT/results.tgz the moment it ends, so
# a cut-off loses only the phase it cut.
#   Usage: OUT=/tmp/x bash scripts/gpu_session.sh [--dry-run] [phases...]
#   phases (default all, in this order):
#     latency    end-to-end action-chunk latency at motus-8b (vla, joint), ours against the reference path
#     attention  bench.attention --tune: every MOTUS_BACKEND=auto candidate per shape class, the dispatch table
#                ($OUT/results/attention_table.json: commit it as bench/results/attention_table.json), auto timed
#     ops        bandwidth of the fused ops (% of HBM peak) and launches per denoise step
#     tests      the GPU tests (pytest-timeout, installed on the lent machines)
#   --dry-run: every phase at tiny size on the CPU (Triton interpreter), to check the script itself.
# The parity fixtures travel as .fixtures/ (a copy of ../shared/fixtures, git-ignored through .git/info/exclude).
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/results"; : > "$OUT/summary.txt"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
PY=${PYTHON:-python3}
if [ $DRY = 1 ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; else unset TRITON_INTERPRET; fi
# kernels/ is installed as motus_fast.kernels (setup.py); on the lent machine (no install) link it in place
[ $DRY = 1 ] || [ -e motus_fast/kernels ] || ln -s ../kernels motus_fast/kernels
[ -d .fixtures ] && export MOTUS_FIXTURES=$PWD/.fixtures
phases=${*:-env latency attention ops tests}
# seconds per phase; the sum (with env) is 540 s. The 2026-11-24 H100 session (bench/results/GPU_SESSIONS.md)
# needed ~140 s for ops and more than 210 s for the whole test suite: the tests come last and may be cut.
T_ENV=${T_ENV:-15} T_LAT=${T_LAT:-150} T_ATTN=${T_ATTN:-120} T_OPS=${T_OPS:-105} T_TESTS=${T_TESTS:-150}
R="$OUT/results"
save() { tar -czf "$OUT/results.tgz" -C "$OUT" results summary.txt $(cd "$OUT" && ls *.log 2>/dev/null); }
run_phase() {   # name limit cmd...
    local name=$1 limit=$2; shift 2; local t=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "== $name: rc=$rc in $(( $(date +%s) - t )) s (limit $limit)" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.log"; save
}
if [ $DRY = 1 ]; then
    LAT=(--preset tiny --device cpu --modes vla --requests 1 --warmup 0 --steps 1)
    ATTN=(--shapes tiny --warmup 0 --iters 1)
    OPS=(--launches --presets tiny --modes vla)
    TESTS=(tests/ops/test_attention_dispatch.py)
else
    LAT=(--preset motus-8b --device cuda --dtype bf16 --image-size 320 384 --modes vla,joint --requests 20 --warmup 3)
    ATTN=(--warmup 5 --iters 30)
    OPS=()
    TESTS=(--timeout=120 tests/ops tests/kernels tests/csrc tests/model/test_parity.py tests/infer/test_engine.py)
fi
for p in $phases; do case $p in
  env) run_phase env "$T_ENV" $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" ;;
  latency) run_phase latency "$T_LAT" $PY -m bench.latency "${LAT[@]}" --out-dir "$R" ;;
  attention) run_phase attention "$T_ATTN" $PY -m bench.attention --tune "${ATTN[@]}" \
          --table "$R/attention_table.json" --out-dir "$R" ;;
  ops) run_phase ops "$T_OPS" $PY -m bench.ops "${OPS[@]}" --out-dir "$R" ;;
  tests) run_phase tests "$T_TESTS" $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
          --junitxml="$R/tests.xml" ;;
  *) echo "unknown phase $p" ;;
esac; done
cat "$OUT/summary.txt"
