#!/usr/bin/env bash
# One GPU session's checks, run from the repository root of a machine with one CUDA GPU:
#   OUT=/some/dir bash benchmarks/gpu_session.sh
# diffusers may come as wheels in .whl/ (installed to /tmp/site) where the machine has no index.
# Phases (each under its own time limit, results packed into $OUT/gpu_session.tgz):
#   1. benchmarks/gpu_check.py: tiny SD3/FLUX/Wan in bf16 on the GPU, CPU/GPU parity of the trainer
#   2. benchmarks/timing.py on the GPU: side-by-side s/iteration, forward+backward share, peak memory
#   3. (BENCH_S > 0) a CPU bench of extra seeds (3-8) on the machine's cores, model.device=cpu
# Time limits (s; 0 skips the phase): CHECK_S (200), TIMING_S (100), BENCH_S (230); ROUNDS (4).
set -u
export PYTHONUNBUFFERED=1
R="$OUT/gpu_session"
mkdir -p "$R"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src"
else
  export PYTHONPATH="$PWD/src"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; lscpu | grep "Model name";
  python3 -c "import sys, torch, diffusers, transformers, peft; print(sys.version.split()[0], torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__)"; } > "$R/machine.txt" 2>&1
cat "$R/machine.txt"

echo "== 1. gpu_check"
if [ "${CHECK_S:-200}" -gt 0 ]; then
  timeout "${CHECK_S:-200}" python3 benchmarks/gpu_check.py --out "$R/check" > "$R/check.log" 2>&1
  echo "rc $?"; tail -60 "$R/check.log"
fi

echo "== 2. timing on the GPU"
if [ "${TIMING_S:-100}" -gt 0 ]; then
  timeout "${TIMING_S:-100}" python3 benchmarks/timing.py --out "$R/timing_gpu" --rounds "${ROUNDS:-4}" \
    --presets dance_grpo,flow_grpo,mix_grpo,mix_grpo_flash,op_grpo,stepwise_grpo,flowpo_flash \
    model.device=cuda "reward.names=[digit_alignment,stroke_quality]" "reward.weights=[1,1]" > "$R/timing_gpu.log" 2>&1
  echo "rc $?"; tail -12 "$R/timing_gpu.log"
fi

echo "== 3. CPU bench of extra seeds (model.device=cpu, all cores but 4)"
if [ "${BENCH_S:-230}" -gt 0 ]; then
  timeout "${BENCH_S:-230}" python3 -m flowpo bench --out "$R/bench_cpu" --iterations 60 --seeds 3,4,5,6,7,8 \
    --tasks alignment,multi --jobs $(( $(nproc) - 4 )) --set eval.every=5 --set model.device=cpu \
    --presets flow_grpo,mix_grpo,mix_grpo_flash,flowpo_flash > "$R/bench_cpu.log" 2>&1
  echo "bench rc $?"; pkill -f "flowpo train" || true
  python3 -m flowpo bench --out "$R/bench_cpu" --report-only \
    --presets flow_grpo,mix_grpo,mix_grpo_flash,flowpo_flash > "$R/bench_report.log" 2>&1
  tail -30 "$R/bench_report.log"
fi
# keep metrics and configs, drop checkpoints and images
tar czf "$OUT/gpu_session.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.png' --exclude='events.*' \
  -C "$OUT" gpu_session
ls -la "$OUT"
