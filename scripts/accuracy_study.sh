#!/usr/bin/env bash
# The accuracy study of docs/accuracy.md: the probe model under global attention (none) and star at
# anchor = block, block/4 and 0 (block = length / 4, the paper's 4 hosts), plus an anchor-size curve on the
# NIAH tasks. Usage: scripts/accuracy_study.sh OUTDIR [extra key=value ...]
#
# STAGES (default: all) picks parts of the study, see the loop at the end.
# HOSTS=4 runs star on 4 ranks (torchrun, one GPU each). The default, HOSTS=1, runs the same 4 blocks on one
# device: star's numbers do not depend on where the blocks run (tests/test_equivalence.py checks CP = 1..4
# against one reference), so the accuracy is the 4-host accuracy.
set -euo pipefail
out=${1:?usage: scripts/accuracy_study.sh OUTDIR [key=value ...]}
shift
extra=("$@")
hosts=${HOSTS:-1}
samples=${SAMPLES:-10}
py=${PYTHON:-python3}
mkdir -p "$out"

run() {  # run BENCH LENGTH MODE ANCHOR_DIVISOR(0 = no anchor) TASKS...
    local bench=$1 len=$2 mode=$3 div=$4
    shift 4
    local block=$((len / 4)) anchor=0 nproc=1 cp=1
    [[ $div != 0 ]] && anchor=$((block / div))
    [[ $mode == star ]] && { nproc=$hosts; cp=$hosts; }
    local tasks
    tasks=$(IFS=,; echo "[$*]")
    "$py" -m torch.distributed.run --standalone --nproc-per-node="$nproc" -m star_mcore eval "$bench" \
        --config configs/eval_probe.yaml model.context_parallel_size="$cp" inference.context_parallel_mode="$mode" \
        inference.block_size="$block" inference.anchor_size="$anchor" "eval.lengths=[$len]" eval.samples="$samples" \
        "eval.tasks=$tasks" eval.output_path="$out/$bench.jsonl" "${extra[@]}" 2>&1 | grep -v -i -e warn -e '%|' || true
}

niah=(niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multivalue niah_multiquery)
ruler_at() {  # global attention, then star at anchor = block, block/4, 0
    run ruler "$1" none 0
    for div in 1 4 0; do run ruler "$1" star "$div"; done
}
# Ordered so that a run cut short has the headline settings first; every eval resumes where its file stops,
# and STAGES picks parts (e.g. STAGES="curve 8k") to spare the model loads of finished ones.
for stage in ${STAGES:-16k 4k babilong curve 8k}; do
    case $stage in
        16k) ruler_at 16384 ;;
        4k) ruler_at 4096 ;;
        8k) ruler_at 8192 ;;
        babilong) run babilong 16384 none 0; for div in 1 4 0; do run babilong 16384 star "$div"; done ;;
        curve) for div in 2 8 16; do run ruler 16384 star "$div" "${niah[@]}"; done ;;
        *) echo "unknown stage $stage (16k 4k 8k babilong curve)" >&2; exit 2 ;;
    esac
done
"$py" -m star_mcore eval-report "$out/ruler.jsonl" --out "$out/ruler.md"
"$py" -m star_mcore eval-report "$out/babilong.jsonl" --out "$out/babilong.md"
