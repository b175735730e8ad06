#!/usr/bin/env bash
# The run scripts/slurm/star-mcore.sbatch does, on this machine only: torchrun, one node, TP x CP ranks.
#
#   scripts/launch.sh CONFIG [key=value ...]
#
# Writes runs/launch-<date>-<time>-<pid>/ under the current directory: config.yaml (the resolved config every
# rank runs), log, and results.jsonl (unless inference.output_path is overridden). Python: $STAR_MCORE_PYTHON,
# else this checkout's .venv/bin/python, else python3.
set -euo pipefail

die() { echo "launch.sh: error: $*" >&2; exit 2; }

(( $# >= 1 )) || die "usage: scripts/launch.sh CONFIG [key=value ...]"
config=$1
shift
[[ -f $config ]] || die "config file not found: $config"
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n ${STAR_MCORE_PYTHON:-} ]]; then
    py=$STAR_MCORE_PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then
    py=$repo/.venv/bin/python
else
    py=python3
fi

# Resolve the config once, before making the run directory, so a bad config leaves nothing behind.
run_dir=$PWD/runs/launch-$(date +%Y%m%d-%H%M%S)-$$
resolved=$("$py" -m star_mcore config --config "$config" "inference.output_path=$run_dir/results.jsonl" "$@")
mkdir -p "$run_dir"
printf '%s\n' "$resolved" >"$run_dir/config.yaml"

info=$("$py" -c '
import sys
from star_mcore.config import load_config, world_size_needed
cfg = load_config(sys.argv[1])
print(cfg.trainer.accelerator, world_size_needed(cfg))' "$run_dir/config.yaml")
read -r accelerator world <<<"$info"

if [[ $accelerator == gpu ]]; then
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # NVLink SHARP (multicast) needs fabric-manager support not every machine has and reserves GPU memory;
    # the small per-layer all-gathers of phase 2 gain nothing from it.
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
fi

echo "launch.sh: $world rank(s) ($accelerator), run directory $run_dir" | tee "$run_dir/log"
"$py" -m torch.distributed.run --standalone --nproc-per-node="$world" \
    -m star_mcore generate --config "$run_dir/config.yaml" 2>&1 | tee -a "$run_dir/log"
echo "launch.sh: done; run directory $run_dir" | tee -a "$run_dir/log"
