#!/usr/bin/env bash
# One GPU session in one command: environment, the GPU test suite, the bench suite. Everything lands in $OUT
# (default ./gpu_out): logs and a results tarball. Each phase has its own time limit so a hang in one still
# leaves the others' results.   Usage: OUT=/tmp/x bash scripts/gpu_session.sh [phases...]
# The parity fixtures travel as .fixtures/ (a copy of ../shared/fixtures, git-ignored through .git/info/exclude);
# the tests phase uses pytest-timeout (installed on the lent machines).
#   phases: env tests attention ops latency   (default: all)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
unset TRITON_INTERPRET
# kernels/ is installed as motus_fast.kernels (setup.py); without installing (no builds here), link it in place
[ -e motus_fast/kernels ] || ln -s ../kernels motus_fast/kernels
[ -d .fixtures ] && export MOTUS_FIXTURES=$PWD/.fixtures
phases=${*:-env tests attention ops latency}
# seconds per phase, from the 2026-11-24 H100 session (bench/results/GPU_SESSIONS.md): the tests needed more than
# 210 s, attention with --sweep more than 190 s, ops ~140 s. A device call may run 600 s: split phases across calls.
T_TESTS=${T_TESTS:-420} T_ATTN=${T_ATTN:-240} T_OPS=${T_OPS:-160} T_LAT=${T_LAT:-120}
summary() { echo "== $1: rc=$2 in $3 s" | tee -a "$OUT/summary.txt"; }
run_phase() {   # name limit cmd...
    local name=$1 limit=$2; shift 2; local t=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    summary "$name" "$rc" "$(( $(date +%s) - t ))"; tail -n 25 "$OUT/$name.log"
}
for p in $phases; do case $p in
  env) { nvidia-smi; python3 -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0))"; nvcc --version | tail -2; } > "$OUT/env.log" 2>&1; cat "$OUT/env.log" | tail -8 ;;
  tests) run_phase tests "$T_TESTS" python3 -m pytest -q --timeout=150 -p no:cacheprovider \
          tests/ops tests/kernels tests/csrc tests/model/test_parity.py tests/infer/test_engine.py \
          --junitxml="$OUT/results/tests_gpu.xml" ;;
  attention) run_phase attention "$T_ATTN" python3 -m bench.attention --sweep --warmup 5 --iters 30 \
          --out-dir "$OUT/results" ;;
  ops) run_phase ops "$T_OPS" python3 -m bench.ops --out-dir "$OUT/results" ;;
  latency) run_phase latency "$T_LAT" python3 -m bench.latency --preset motus-8b --device cuda --dtype bf16 \
          --image-size 320 384 --modes vla,joint --requests 20 --warmup 3 --out-dir "$OUT/results" ;;
  *) echo "unknown phase $p" ;;
esac; done
tar -czf "$OUT/results.tgz" -C "$OUT" results $(cd "$OUT" && ls *.log) 2>/dev/null
cat "$OUT/summary.txt"
