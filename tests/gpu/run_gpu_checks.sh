#!/usr/bin/env bash
# The recipe's checks on one GPU, in one command, in under 8 minutes, on a machine with PyTorch and no internet:
#   1. install megatron-core, megatron-energon, diffusers and pytest from the wheels tools/gpu_wheels.sh
#      downloaded (WHEELS, default .whl) with --no-index, unless they import already;
#   2. the GPU tests (tests/gpu, marked gpu): the local spec in bf16, the attention's memory, TE and FP8;
#   3. a 50-iteration pretrain_dit.py run (DiT-B, bf16, packs of 8192 tokens) on a synthetic dataset it writes,
#      saving a checkpoint (with the default EMA) half-way and at the end, then a run resumed from the half-way
#      checkpoint, whose losses are compared with the first run's;
#   4. a 10-iteration FP8 run per recipe this GPU has kernels for (dit.model.fp8.MIN_CAPABILITY), where TE imports;
#   5. with 2 or more GPUs, TE's CP=2 and TP=2 with SP against one GPU (tests/gpu/te_parallel.py);
#   6. a 10-iteration --use-megatron-fsdp run on every GPU (megatron-core 0.17+; skipped on 0.16);
#   7. bench_step.py (with host_syncs_per_step from dit.training.host_syncs' counter, and the warnings of
#      torch.cuda.set_sync_debug_mode("warn")) and
#      bench_model.py for DiT-B and DiT-XL at 8192 tokens in bf16, and in FP8 where TE imports.
# Every part has its own time limit, cut to what is left of the whole run's budget (BUDGET_S, 470 s).
# Results go to OUT (default runs/gpu_checks): summary.json (each part's status and numbers) and logs.txt
# (every part's output); a table closes the run. Exit status 0 when every part is ok or skipped.
#
#   bash tests/gpu/run_gpu_checks.sh             # on the GPU machine
#   bash tests/gpu/run_gpu_checks.sh --dry-run   # the same steps and flags at tiny sizes on the CPU: CI's proof of
#                                                # the wiring (the GPU tests run on the CPU, TE and FP8 skip)
# PYTHON: the interpreter (default ./.venv/bin/python where it exists, else python3).
set -uo pipefail  # no -e: a failing part is recorded and the next one runs
cd "$(dirname "$0")/../.."

dry=0
case "${1:-}" in
    --dry-run) dry=1 ;;
    "") ;;
    *) echo "usage: bash tests/gpu/run_gpu_checks.sh [--dry-run]" >&2; exit 2 ;;
esac
out=${OUT:-runs/gpu_checks}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$out/logs.txt"
: > "$work/parts.tsv"
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
wheels=${WHEELS:-.whl}
site=${GPU_SITE:-/tmp/dit-gpu-site}
budget=${BUDGET_S:-470}
export PYTHONUNBUFFERED=1

# part NAME LIMIT_S NOTE CMD...: run CMD, its output in $work/NAME.log (and appended to logs.txt), killed at
# its limit or when the budget runs out; NOTE travels to results.py (the train part's iteration count)
part() {
    local name=$1 limit=$2 note=$3
    shift 3
    local left=$((budget - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        skip_part "$name" "out of time (budget ${budget} s)"
        return
    fi
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS rc
    timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - start)) "$limit" "$note" >> "$work/parts.tsv"
    { echo "===== $name: exit $rc after $((SECONDS - start)) s: $*"; cat "$work/$name.log"; } >> "$out/logs.txt"
    echo "   exit $rc after $((SECONDS - start)) s"
}
skip_part() {
    local reason=${2//[$'\t\n']/ }  # one row of the table
    printf '%s\tskipped\t0\t0\t%s\n' "$1" "$reason" >> "$work/parts.tsv"
    echo "== $1: skipped, $2"
}

if ((dry)); then
    # tiny sizes on the CPU, the benchmarks for one size and in fp32 there (CPU bf16 matmuls are ~10x slower):
    # the wiring, not the numbers
    export DIT_GPU_TESTS_ON_CPU=1
    device=cpu precision=() threads=2 iterations=3 sizes=(DiT-B)
    data_args=(--samples 24 --video-fraction 0 --latent-channels 4 --text-embed-dim 32 --samples-per-shard 8)
    train_args=(--num-layers 1 --hidden-size 48 --num-attention-heads 4 --latent-channels 4 --text-embed-dim 32
                --max-seq-length 1024 --packing-buffer-size 8 --num-workers 0 --log-interval 1)
    step_args=(--num-layers 1 --max-seq-length 256 --samples 4 --rounds 1 --steps-per-round 1 --num-workers 0)
    model_args=(--num-layers 1 --max-seq-length 256 --rounds 1 --attention-lengths 256 512)
else
    device=cuda precision=(--bf16) threads=8 iterations=50 sizes=(DiT-B DiT-XL)
    data_args=(--samples 400 --samples-per-shard 50)  # 30% video: samples of 256 to 7,936 tokens
    train_args=(--model-size DiT-B --max-seq-length 8192 --packing-buffer-size 100 --num-workers 2 --log-interval 10)
    step_args=(--max-seq-length 8192 --rounds 5 --steps-per-round 2)
    model_args=(--max-seq-length 8192 --rounds 10 --attention-lengths 8192 16384 32768)
fi

# 1. packages
imports="import megatron.core, megatron.energon, diffusers, pytest"
if "$python" -c "$imports" 2>/dev/null; then
    skip_part install "megatron-core, megatron-energon, diffusers and pytest import already"
else
    # the wheels into their own folder, without dependency resolution: torch and the rest stay the machine's own
    install='[ -n "$(ls "$3"/*.whl 2>/dev/null)" ] || { echo "no wheels in $3: run bash tools/gpu_wheels.sh where there is internet"; exit 2; }
             "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$3"/*.whl &&
             PYTHONPATH="$2" PATH="$2/bin:$PATH" "$1" -c "$4" && echo "installed into $2: $(ls "$3" | wc -l) wheels"'
    part install 120 "" bash -c "$install" _ "$python" "$site" "$wheels" "$imports"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"  # energon's command is in bin
fi

# 2. the GPU tests
part tests 150 "" "$python" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs --junitxml="$work/tests.xml"

# 3. a short training run on a synthetic dataset, saved with its EMA, and resumed from half-way
half=$((iterations / 2))
part dataset 60 "" "$python" -m data.synthetic "$work/data" "${data_args[@]}"
part train 150 "$iterations" "$python" pretrain_dit.py --data-path "$work/data" --bf16 --train-iters "$iterations" \
    --lr 1e-4 --save "$work/ckpt" --save-interval "$half" "${train_args[@]}"
part resume 90 "$iterations" "$python" pretrain_dit.py --data-path "$work/data" --bf16 --train-iters "$iterations" \
    --lr 1e-4 --load "$work/ckpt" --ckpt-step "$half" --save "$work/ckpt_resumed" "${train_args[@]}"

# 4. FP8: a short run per recipe this GPU runs (TE's compute-capability rule, dit/model/fp8.py)
fp8=()
if "$python" -c "import transformer_engine.pytorch" 2>/dev/null && ((!dry)); then
    fp8=(--fp8-format hybrid)
    for recipe in $("$python" -c "import torch; from dit.model.fp8 import MIN_CAPABILITY as m
print(' '.join(r for r, (cc, _) in m.items() if torch.cuda.get_device_capability() >= cc))"); do
        part "train_fp8_$recipe" 60 10 "$python" pretrain_dit.py --data-path "$work/data" --bf16 --train-iters 10 \
            --lr 1e-4 "${fp8[@]}" --fp8-recipe "$recipe" "${train_args[@]}"
    done
else
    skip_part fp8 "transformer_engine does not import (or --dry-run): no FP8 runs"
fi

# 5. TE's context and tensor parallel on 2 GPUs (the same script's wiring with the local layers is a test of the
#    suite's slow tier, tests/gpu/test_gpu_te_parallel.py, so the dry run does not repeat it)
if ((dry)); then
    skip_part te_parallel "--dry-run: its wiring is tests/gpu/test_gpu_te_parallel.py's CPU test"
elif (($("$python" -c "import torch; print(torch.cuda.device_count())") >= 2)) && ((${#fp8[@]})); then
    part te_parallel 90 "" "$python" -m torch.distributed.run --nproc-per-node 2 tests/gpu/te_parallel.py
else
    skip_part te_parallel "needs 2 GPUs and Transformer Engine"
fi

# 6. Megatron-FSDP (megatron-core 0.17+) on every GPU (DP = their count), bf16: proven against DDP on the CPU over
#    gloo (tests/integration/test_training_layouts.py); here its GPU path (NCCL, side streams, PREMUL_SUM) trains 10 steps
fsdp_missing=$("$python" -c "from dit.runtime.mcore019 import megatron_fsdp_missing as m; print(m() or '')" 2>&1)
if [ -z "$fsdp_missing" ]; then
    ranks=$( ((dry)) && echo 2 || "$python" -c "import torch; print(torch.cuda.device_count())")
    fsdp_iters=$( ((dry)) && echo 2 || echo 10)
    part train_fsdp 90 "$fsdp_iters" "$python" -m torch.distributed.run --nproc-per-node "$ranks" pretrain_dit.py \
        --data-path "$work/data" --bf16 --train-iters "$fsdp_iters" --lr 1e-4 --use-megatron-fsdp \
        "${train_args[@]}"
else
    skip_part train_fsdp "$fsdp_missing"
fi

# 7. the benchmarks, bf16 (and FP8 where TE imports) at 8192 tokens
for size in "${sizes[@]}"; do
    part "bench_step_$size" 120 "" "$python" benchmarks/bench_step.py --device "$device" --model-size "$size" \
        --threads "$threads" "${precision[@]}" "${step_args[@]}"
    if ((${#fp8[@]})); then
        part "bench_step_${size}_fp8" 120 "" "$python" benchmarks/bench_step.py --device "$device" --model-size "$size" \
            --threads "$threads" "${precision[@]}" "${fp8[@]}" "${step_args[@]}"
    fi
    part "bench_model_$size" 150 "" "$python" benchmarks/bench_model.py --device "$device" --model-size "$size" \
        --threads "$threads" "${precision[@]}" "${fp8[@]}" "${model_args[@]}"
done

"$python" tests/gpu/results.py "$work" "$out"
