#!/usr/bin/env bash
# What the small UltraMemV2 needs: the small-* comparison with in-distribution validation
# (data.val_split = "spread") and one-at-a-time sweeps of the memory settings around
# small-ultramem-v2, on one GPU, as committed under perf/results/sweep-small-h200/.
#
#   PYTHONPATH=. [SET=five] bash perf/sweep_small_gpu.sh OUT_DIR [TOKENS] [DEADLINE_SECONDS]
#
# Each line of `runs` below is one `python -m ultramem.compare` (through compare_gpu.sh, on its
# corpus) in outputs/sweeps/<name>; $LANES of them (default 3) share the GPU at a time, so their
# tokens/s are not comparable with each other or with a run alone; the losses are. With a deadline
# every comparison still running then is stopped (its trainer checkpoints), and running the script
# again resumes them and skips the finished runs. Each run keeps its newest checkpoint only, and a
# finished run's is deleted (17 runs of about 3.5 GB fill a 64 GB disk) unless KEEP_CHECKPOINTS=1.
set -euo pipefail
out=${1:?OUT_DIR}
tokens=${2:-24M}
deadline=$((SECONDS + ${3:-0}))
lanes=${LANES:-3}
here=$(dirname "$0")
export CORPUS_DIR=${CORPUS_DIR:-outputs/gpu-corpus}
bash "$here/compare_gpu.sh" --corpus-only

runs=(
    "baseline small-dense,small-moe,small-ultramem-v2"
    "value-lr small-ultramem-v2 --sweep optim.value_lr_mult=1,2"
    "init small-ultramem-v2 --sweep model.memory.init=released"
    "pre-values small-ultramem-v2 --sweep model.memory.pre_vdim=0"
    "knn small-ultramem-v2 --sweep model.memory.knn=16,64"
    "rows small-ultramem-v2 --sweep model.memory.knum=200"
    "others small-memory-plus,small-ultramem-v1"
    "combo small-ultramem-v2 --sweep model.memory.pre_vdim=0 --sweep optim.value_lr_mult=1,2"
    "combo-knn small-ultramem-v2 --sweep model.memory.pre_vdim=0 --sweep optim.value_lr_mult=1 --sweep model.memory.knn=64"
    "seeds small-ultramem-v2,small-moe --seeds 1,2"
    "seeds-combo small-ultramem-v2 --sweep model.memory.pre_vdim=0 --sweep optim.value_lr_mult=1 --seeds 1,2"
    "seeds-knn small-ultramem-v2 --sweep optim.value_lr_mult=1 --sweep model.memory.knn=64 --seeds 0,1,2"
)
# SET=five: five seeds of the default and of the two single changes that looked best at seed 0
# (knn 64 is left out: with value lr x1 it gained 0.003 over three seeds), and the placement:
# four memory layers with the same rows in all (knum 402), reading one block before they add (as
# UltraMem v1) or in the block they add to. One lane per line: LANES=4.
if [[ ${SET:-} == five ]]; then
    runs=(
        "five-default small-ultramem-v2 --seeds 3,4"
        "five-value-lr small-ultramem-v2 --sweep optim.value_lr_mult=1 --seeds 1,2,3,4"
        "five-pre-values small-ultramem-v2 --sweep model.memory.pre_vdim=0 --seeds 1,2,3,4"
        "placement small-ultramem-v2 --sweep model.memory.insert=0:1/2:3/4:5/6:7,0:0/2:2/4:4/6:6 --sweep model.memory.knum=402 --seeds 0,1"
    )
fi

prune() {  # prune NAME: delete the checkpoints of the lane's finished runs
    [[ ${KEEP_CHECKPOINTS:-0} == 1 ]] && return
    for run in outputs/sweeps/"$1"/*/; do
        if grep -q '"status": "done"' "$run/compare.json" 2>/dev/null; then rm -rf "$run/checkpoints"; fi
    done
}

lane() {  # lane NAME CONFIGS STOP_AFTER ARGS...
    local name=$1 configs=$2 stop=$3
    shift 3
    # a lane's runs follow each other: free each one's disk as soon as it is done
    (while sleep 20; do prune "$name"; done) &
    local pruner=$!
    CONFIGS=$configs RUNS_DIR=outputs/sweeps/$name bash "$here/compare_gpu.sh" "$out/$name" "$tokens" "$stop" \
        --extra=--data.val_split=spread --extra=--checkpoint.keep=1 "$@" || true
    kill "$pruner"
    prune "$name"
}

mkdir -p "$out"
for spec in "${runs[@]}"; do
    read -r name configs args <<<"$spec"
    while [[ $(jobs -rp | wc -l) -ge $lanes ]]; do wait -n || true; done
    left=0
    if [[ ${3:-0} -gt 0 ]]; then
        left=$((deadline - SECONDS))
        [[ $left -gt 60 ]] || { echo "$name: not started, deadline reached"; continue; }
    fi
    echo "$name: started ($configs $args)"
    # shellcheck disable=SC2086  # args are words on purpose
    lane "$name" "$configs" "$left" $args >"$out/$name.log" 2>&1 &
done
wait
grep -h "^| small" "$out"/*/results.md | sort -t'|' -k9 || true
