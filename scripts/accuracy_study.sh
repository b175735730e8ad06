#!/usr/bin/env bash
# The accuracy study of docs/accuracy.md: global attention (none) and star with 4 blocks (block = length / 4)
# at anchor = block, block/4 and 0 on RULER; BABILong at the same settings; an anchor-size curve (b/2, b/8,
# b/16) on six NIAH tasks. Usage: scripts/accuracy_study.sh OUTDIR [extra key=value ...]
#
# Environment (defaults in brackets):
#   CONFIG   the eval config [configs/eval_smollm2.yaml: SmolLM2-135M-Instruct, its chat template, bf16, GPU]
#   LONG     the long length [8064: the model's 8192 positions less RULER's largest answer budget, 128]
#   STAGES   what to run, in this order [$LONG 4096 babilong curve]: a number N = RULER at N tokens;
#            babilong = BABILong at $LONG; curve = the anchor curve at $LONG
#   TASKS    RULER tasks, comma-separated [the six NIAH tasks of the anchor curve, vt, cwe, fwe; add
#            niah_multikey_2,niah_multikey_3 for all 11 synthetic ones; qa_1 / qa_2 need eval.squad_path /
#            eval.hotpotqa_path given as extra key=value]
#   SAMPLES  per task, length and setting [20]
#   JOBS     evals at once [1]; a 135M model leaves a GPU mostly idle, so one GPU holds all 15 of the default
#            stages at once (JOBS=15) and their start-up (~20 s each: imports, model, CUDA) overlaps
#   SPLIT    1: one eval per task (more, shorter evals: for slow settings, e.g. inference.decode=eager) [0]
#   GPUS     GPUs to spread the evals over, round robin [those nvidia-smi lists; 0 = none, e.g. on CPU]
#   HOSTS    star's ranks per eval [1: the 4 blocks on one device give the 4-host numbers, see docs/accuracy.md]
#
# Each eval writes its own file, OUTDIR/<benchmark>/<length>.<setting>[.<task>].jsonl, and its log to
# OUTDIR/logs/; every eval resumes from its file, so an interrupted study goes on when the same command is
# run again (with the same SPLIT).
# At the end: OUTDIR/ruler.jsonl and OUTDIR/babilong.jsonl (all settings) and eval-report's tables and plots.
# Stopped (SIGTERM or SIGINT, e.g. by `timeout`), it stops its evals before it exits.
set -euo pipefail
trap 'trap - TERM INT; kill $(jobs -p) 2>/dev/null; wait; echo "stopped; run the same command again to go on" >&2; exit 143' TERM INT
out=${1:?usage: scripts/accuracy_study.sh OUTDIR [key=value ...]}
shift
extra=("$@")
config=${CONFIG:-configs/eval_smollm2.yaml}
long=${LONG:-8064}
samples=${SAMPLES:-20}
jobs=${JOBS:-1}
split=${SPLIT:-0}
hosts=${HOSTS:-1}
gpus=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
py=${PYTHON:-python3}
mkdir -p "$out/logs"
rm -f "$out"/logs/*.failed
started=0

run() {  # run BENCH LENGTH MODE ANCHOR_DIVISOR(0 = no anchor) TASK... (one eval, or one per task with SPLIT)
    if ((split && $# > 5)); then
        local task
        for task in "${@:5}"; do run "$1" "$2" "$3" "$4" "$task"; done
        return
    fi
    local bench=$1 len=$2 mode=$3 div=$4
    shift 4
    local block=$((len / 4)) anchor=0 nproc=1 cp=1 name tasks
    [[ $div != 0 ]] && anchor=$((block / div))
    [[ $mode == star ]] && { nproc=$hosts; cp=$hosts; }
    tasks=$(IFS=,; echo "[$*]")
    name="$len.$mode"
    [[ $mode == star ]] && name+=$([[ $div == 0 ]] && echo "-anchor0" || echo "-anchor-b$div")
    if ((split)); then name+=".$1"; elif [[ $bench == ruler && $# != ${#ruler_tasks[@]} ]]; then name+=".$#tasks"; fi
    mkdir -p "$out/$bench"
    while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
    local env=()
    ((gpus > 0 && nproc == 1)) && env=(CUDA_VISIBLE_DEVICES=$((started % gpus)))
    started=$((started + 1))
    echo "start: $bench $name"
    (
        env "${env[@]}" "$py" -m torch.distributed.run --standalone --nproc-per-node="$nproc" -m star_mcore eval \
            "$bench" --config "$config" model.context_parallel_size="$cp" inference.context_parallel_mode="$mode" \
            inference.block_size="$block" inference.anchor_size="$anchor" "eval.lengths=[$len]" \
            eval.samples="$samples" "eval.tasks=$tasks" eval.output_path="$out/$bench/$name.jsonl" "${extra[@]}" \
            >"$out/logs/$bench.$name.log" 2>&1 &
        child=$!
        trap 'kill "$child" 2>/dev/null; wait "$child"; exit 143' TERM  # torchrun stops its ranks
        if wait "$child"; then
            echo "done:  $bench $name ($(grep -o 'done: .*' "$out/logs/$bench.$name.log" | tail -n 1))"
        else
            touch "$out/logs/$bench.$name.failed"
            echo "FAILED: $bench $name; the end of $out/logs/$bench.$name.log:" >&2
            tail -n 3 "$out/logs/$bench.$name.log" >&2
        fi
    ) &
}

niah=(niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multivalue niah_multiquery)
ruler_tasks=("${niah[@]}" vt cwe fwe)
[[ -n ${TASKS:-} ]] && IFS=, read -r -a ruler_tasks <<<"$TASKS"
babilong_tasks=(qa1 qa2 qa3 qa4 qa5)
for stage in ${STAGES:-$long 4096 babilong curve}; do
    case $stage in
        babilong) run babilong "$long" none 0 "${babilong_tasks[@]}"
                  for div in 1 4 0; do run babilong "$long" star "$div" "${babilong_tasks[@]}"; done ;;
        curve) for div in 2 8 16; do run ruler "$long" star "$div" "${niah[@]}"; done ;;
        *[!0-9]* | "") echo "unknown stage $stage (a length, babilong or curve)" >&2; exit 2 ;;
        *) run ruler "$stage" none 0 "${ruler_tasks[@]}"
           for div in 1 4 0; do run ruler "$stage" star "$div" "${ruler_tasks[@]}"; done ;;
    esac
done
wait
for bench in ruler babilong; do
    files=("$out/$bench"/*.jsonl)
    [[ -e ${files[0]} ]] || continue
    cat "${files[@]}" >"$out/$bench.jsonl"
    "$py" -m star_mcore eval-report "$out/$bench.jsonl" --out "$out/$bench.md"
done
failed=("$out"/logs/*.failed)
if [[ -e ${failed[0]} ]]; then
    echo "${#failed[@]} eval(s) failed: ${failed[*]}" >&2
    exit 1
fi
