#!/usr/bin/env bash
# The small-* comparison on one GPU, as committed under perf/results/compare/.
#
#   PYTHONPATH=. bash perf/compare_gpu.sh OUT_DIR [TOKENS] [STOP_AFTER_SECONDS] [COMPARE ARGS...]
#   PYTHONPATH=. bash perf/compare_gpu.sh --corpus-only
#
# 1. Builds the corpus once ($CORPUS_DIR, default outputs/gpu-corpus): the Python, C/C++ and Markdown sources of the
#    torch, transformers and triton packages installed on the machine, a byte-level BPE of 8192
#    (the small-* vocabulary) trained on them.
# 2. Runs `python -m ultramem.compare` over the six small-* configs ($CONFIGS) for TOKENS (default
#    24M, under one epoch of that corpus), validating every 2M tokens, in $RUNS_DIR
#    (default outputs/compare-gpu). More arguments go to the comparison, e.g.
#    --extra=--data.val_split=spread or --sweep optim.value_lr_mult=1,4.
# 3. Copies the table, the plots, meta.json and each run's logs into OUT_DIR.
#
# With STOP_AFTER_SECONDS the comparison is sent SIGTERM after that long: the running trainer
# saves a checkpoint and stops, and running the script again resumes it and skips finished runs.
set -euo pipefail
out=${1:?OUT_DIR}
tokens=${2:-24M}
stop_after=${3:-0}
shift $(($# < 3 ? $# : 3))
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

data=${CORPUS_DIR:-outputs/gpu-corpus}
runs=${RUNS_DIR:-outputs/compare-gpu}
if [[ ! -f $data/meta.json ]]; then
    purelib=$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    workers=$($py -c 'import os; print(min(os.cpu_count(), 16))')
    time $py -m ultramem.data prepare "$purelib/torch" "$purelib/transformers" "$purelib/triton" \
        --out $data --vocab-size 8192 --workers "$workers" --no-progress
fi
[[ $out == --corpus-only ]] && exit 0

configs=${CONFIGS:-small-ultramem-v2,small-dense,small-moe,small-ultramem-v1,small-memory-plus,small-dense-wide}
cmd=($py -m ultramem.compare --configs $configs --tokens "$tokens" --eval-every 2M --data $data
    --out "$runs" "$@")
echo "${cmd[*]}"
if [[ $stop_after -gt 0 ]]; then
    timeout -s TERM -k 120 "$stop_after" "${cmd[@]}" || echo "compare stopped with status $?"
else
    "${cmd[@]}"
fi

mkdir -p "$out"
cp $data/meta.json "$out/corpus-meta.json"
cp "$runs"/results.* "$runs"/*.png "$out/" 2>/dev/null || true
for run in "$runs"/*/; do
    name=$(basename "$run")
    mkdir -p "$out/$name"
    cp "$run"/metrics.jsonl "$run"/compare.log "$run"/train.log "$out/$name/" 2>/dev/null || true
done
