#!/usr/bin/env bash
# Issue 20, item 5: one iteration at FULL depth on one GPU, bf16 with gradient checkpointing,
# random weights at the published configs (benchmarks/real_shapes.py builds them; nothing is
# downloaded): SD3.5-Medium at 512 px and FLUX.1-dev at 720 px, the papers' group sizes scaled to
# one GPU (Flow-GRPO SD3.5-M: G 24 over its GPUs → 8 here, T 10; DanceGRPO / MixGRPO FLUX: G 12 → 4,
# T 16). Reports s/iteration, the transformer's share, peak GPU memory and the model FLOPs
# utilisation of the update (real_shapes.py's MFU table). Run from the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_real_shapes.sh        # about 5–7 minutes on an H200 (estimate, at most 9.5)
#
# then commit $OUT/real_shapes_gpu/* under benchmarks/gpu/. A CPU smoke test of the same path:
#   OUT=/tmp/x DEVICE=cpu SD3_DEPTH=1 FLUX_DEPTH=1,1 SD3_RES=64 FLUX_RES=64 SD3_G=2 FLUX_G=2 \
#     SD3_T=3 FLUX_T=3 TEXT_SD3=8 TEXT_FLUX=8 DTYPE=fp32 PEAK=0.2 bash benchmarks/gpu_real_shapes.sh
set -u
export PYTHONUNBUFFERED=1
R="${OUT:?set OUT}/real_shapes_gpu"
mkdir -p "$R"
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels shipped with the tree, for a machine without an index
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src"
else
  export PYTHONPATH="$PWD/src"
fi
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bf16}"
WORK="${WORK:-/tmp/flowpo_real_shapes_gpu}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc;
  python3 -c "import sys, torch, diffusers, transformers, peft; print(sys.version.split()[0], torch.__version__, diffusers.__version__, transformers.__version__, peft.__version__)"; } > "$R/machine.txt" 2>&1
cat "$R/machine.txt"
COMMON=(--threads "$(nproc)" --timed 1 --mode lora --work "$WORK" --keep --build-device "$DEVICE"
        --build-dtype "$([ "$DTYPE" = bf16 ] && echo bf16 || echo fp32)" --passes-out "$R/passes.csv"
        --set "model.device=$DEVICE" --set "model.dtype=$DTYPE" --set model.gradient_checkpointing=true)
[ -n "${PEAK:-}" ] && COMMON+=(--peak-tflops "$PEAK")

# One invocation per (model, preset), each under its own limit, so that a configuration running
# out of time loses only its own row; the first of each model also builds the weights (kept in
# $WORK for the second). Worst case 150 + 90 + 200 + 130 s = 9.5 minutes; estimated 5–7.
run() {  # model preset limit_s model-args...
  local model=$1 preset=$2 limit=$3; shift 3
  echo "== $model $preset $*"
  timeout "$limit" python3 benchmarks/real_shapes.py --models "$model" --presets "$preset" --timeout "$limit" \
    "${COMMON[@]}" "$@" --out "$R/${model}_${preset}.csv" --md "$R/${model}_${preset}.md" > "$R/${model}_${preset}.log" 2>&1
  echo "rc $?"; grep -v "^|---" "$R/${model}_${preset}.log" | tail -12
}
SD3=(--depth "${SD3_DEPTH:-24}" --res "${SD3_RES:-512}" --groups "${SD3_G:-8}" --steps "${SD3_T:-10}" --text-len "${TEXT_SD3:-256}")
FLUX=(--flux-depth "${FLUX_DEPTH:-19,38}" --res "${FLUX_RES:-720}" --groups "${FLUX_G:-4}" --steps "${FLUX_T:-16}" --text-len "${TEXT_FLUX:-512}")
run sd3 flow_grpo "${SD3_S:-150}" "${SD3[@]}"
run sd3 mix_grpo_flash "${SD3B_S:-90}" "${SD3[@]}"
run flux dance_grpo "${FLUX_S:-200}" "${FLUX[@]}"
run flux mix_grpo_flash "${FLUXB_S:-130}" "${FLUX[@]}"
[ "$WORK" = /tmp/flowpo_real_shapes_gpu ] && rm -rf "$WORK"  # (a WORK you chose is kept)
