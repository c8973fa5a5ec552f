#!/usr/bin/env bash
# The host path's measurements on one GPU (perf/NOTES.md, "The host path without CUDA graphs"),
# one part per call, each within about 10 minutes:
#
#   PYTHONPATH=. bash perf/host_path_gpu.sh OUT_DIR PART [BASE_TREE]
#
# PART:
#   tests      the CUDA tests of the ops, the layers and the trainer, three groups at once
#                                                                  -> tests_{ops,layers,trainer}.txt, tests.txt
#   ops        the statistics op and the staged backward, with the compiled
#              references (perf/benches/layer_stats.py, staged_flush.py)    -> ops.txt, ops.json
#   ab         the 227M trainer's step, default compile mode: dense, UltraMemV2, and UltraMemV2 on
#              BASE_TREE (a checkout of an earlier commit, e.g. `git archive C | tar -x -C DIR`),
#              variants alternating in one process                          -> ab.txt
#   ab-graphs  the same under CUDA graphs                                   -> ab-graphs.txt
#   launchers  UltraMemV2 in default mode as it is and with Inductor's static launcher for user
#              Triton kernels (trainer_ab)                                  -> launchers.txt
#   regions    one micro-batch of the whole-model region as it is, with Inductor's combo kernels,
#              and without the layers' statistics (compile_regions)         -> regions.txt
#   options    perf.diagnostics.inductor_options                           -> options.txt
#   stack      per layer, the 227M's 20 memory layers compiled as one function against 20 FFNs,
#              fwd + bwd, wall and GPU time, atomics and staged (gpu_e2e --only stack; its records:
#              perf.legacy.convert of stack.json; STACK_VARIANTS: some of its variants, e.g.
#              "stack_layer stack_layer_staged stack_ffn", each a compile less) -> stack.txt, stack.json
#   inputs     the 227M trainer's step, UltraMemV2 with the table gradients' buffers passed by id
#              and as tensors (train.table_grads_as_inputs), default mode and CUDA graphs
#              (trainer_ab)                                                 -> inputs.txt
#   fsdp-inputs the 227M trainer's step under FSDP2 on one GPU (a process group of one), default
#              mode: the table gradients' buffers by id (the default under FSDP) and as tensors
#              (trainer_ab)                                                 -> fsdp_inputs.txt
#   fsdp-staged the 227M trainer's step under FSDP2 on one GPU, default mode: the table gradients
#              added at once (the default under FSDP) and staged (train.table_grad_staging)
#              (trainer_ab)                                                 -> fsdp_staged.txt
#   decode     one layer at decode shapes, eval: eager, compiled, graphs, replay; with and without
#              inference_cache (perf.diagnostics.decode_layer)                -> decode.txt
#   decode-aoti the cached bf16 layer at decode shapes compiled by AOTInductor, called through its
#              C++ runner, against torch.compile; one add both ways (perf.diagnostics.decode_aoti;
#              CXX=g++ where $CXX links libstdc++ statically: such packages crash on load)
#                                                                              -> decode_aoti.txt
#   decode-ab  decode-aoti's layer alone (--layer-only) in BASE_TREE, then in this tree, one after
#              the other on the same machine ($DECODE_AOTI_ARGS passed to both; the base's records
#              name $BASE_REV, "unknown" without it)                          -> decode_ab.txt
#   layer-host where one compiled layer's host time goes, its training step with atomics and
#              staged (perf.diagnostics.layer_host_profile)                 -> layer_host.txt,
#                                                                              layer_host_staged.txt
#
# Records go to OUT_DIR/log.jsonl (append them to perf/results/log.jsonl), text to the files above.
set -euo pipefail
out=${1:?OUT_DIR}
part=${2:?PART: tests, ops, ab, ab-graphs, launchers, regions, options, stack, inputs, fsdp-inputs, fsdp-staged, decode, decode-aoti, decode-ab or layer-host}
base=${3:-}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
log=$out/log.jsonl

ab() {  # trainer_ab in one compile mode, with the base tree as a third variant when given
    local mode=$1
    local args=(--common=--train.compile_mode=$mode --variant dense=--model.memory.type=none --variant v2=)
    if [[ -n $base ]]; then
        [[ -d $base ]] || { echo "BASE_TREE $base is not a directory" >&2; exit 2; }
        args+=(--variant v2_base= --tree "v2_base=$base")
    fi
    $py -m perf.diagnostics.trainer_ab "${args[@]}" --log "$log"
}

case $part in
    tests)
        # three groups at once (compiling is most of their time and the host has 16 cores), each
        # with a limit, so that the part fits one 10-minute call
        t="timeout 500 $py -m pytest -q -p no:logging"
        $t tests/ops/test_ops_cuda.py tests/ops/test_inline_triton_cuda.py > "$out/tests_ops.txt" 2>&1 &
        $t tests/ops/test_lookup_into.py tests/layers/test_grads_as_inputs.py tests/ops/test_kernel_access.py \
            tests/layers/test_layers_gpu.py tests/layers/test_grad_buffers.py > "$out/tests_layers.txt" 2>&1 &
        $t tests/train/test_trainer.py -k cuda > "$out/tests_trainer.txt" 2>&1 &
        rc=0
        for job in $(jobs -p); do wait "$job" || rc=1; done
        for f in ops layers trainer; do echo "== $f"; tail -n 3 "$out/tests_$f.txt"; done | tee "$out/tests.txt"
        exit $rc
        ;;
    ops)
        $py -m perf.bench_ops --only layer_stats staged_flush --compile --out "$out/ops.json" 2>&1 | tee "$out/ops.txt"
        ;;
    ab) ab default 2>&1 | tee "$out/ab.txt" ;;
    ab-graphs) ab reduce-overhead 2>&1 | tee "$out/ab-graphs.txt" ;;
    launchers)
        $py -m perf.diagnostics.trainer_ab --common=--train.compile_mode=default --variant v2= \
            --variant v2_static= --env v2_static=TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1 \
            --log "$log" 2>&1 | tee "$out/launchers.txt"
        ;;
    regions)
        $py -m perf.diagnostics.compile_regions --config 227m.toml --batch 3 --seq 4096 \
            --variant model=model --variant combo=model,combo_kernels=True \
            --variant nostats=model,layer_stats=off --log "$log" 2>&1 | tee "$out/regions.txt"
        ;;
    inputs)
        for mode in default reduce-overhead; do
            $py -m perf.diagnostics.trainer_ab --common=--train.compile_mode=$mode \
                --variant v2_ids=--train.table_grads_as_inputs=false --variant v2= --log "$log"
        done 2>&1 | tee "$out/inputs.txt"
        ;;
    fsdp-inputs)
        WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
            $py -m perf.diagnostics.trainer_ab --common=--train.compile_mode=default --common=--parallel.mode=fsdp \
            --variant v2_ids=--train.table_grads_as_inputs=false --variant v2_tensors=--train.table_grads_as_inputs=true \
            --log "$log" 2>&1 | tee "$out/fsdp_inputs.txt"
        ;;
    fsdp-staged)
        WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 \
            $py -m perf.diagnostics.trainer_ab --common=--train.compile_mode=default --common=--parallel.mode=fsdp \
            --variant v2= --variant v2_staged=--train.table_grad_staging=true \
            --log "$log" 2>&1 | tee "$out/fsdp_staged.txt"
        ;;
    options) $py -m perf.diagnostics.inductor_options --log "$log" 2>&1 | tee "$out/options.txt" ;;
    stack)
        # STACK_VARIANTS="stack_layer_staged stack_ffn" (say) times only those: each compiles anew
        # shellcheck disable=SC2086
        $py -m perf.gpu_e2e --only stack ${STACK_VARIANTS:+--stack-variants $STACK_VARIANTS} --out "$out/stack.json" 2>&1 |
            tee "$out/stack.txt"
        ;;
    decode) $py -m perf.diagnostics.decode_layer --log "$log" 2>&1 | tee "$out/decode.txt" ;;
    decode-aoti)  # $DECODE_AOTI_ARGS: more arguments, e.g. --inductor-config max_autotune=True
        $py -m perf.diagnostics.decode_aoti --log "$log" ${DECODE_AOTI_ARGS:-} 2>&1 | tee "$out/decode_aoti.txt"
        ;;
    decode-ab)
        [[ -d $base ]] || { echo "decode-ab needs BASE_TREE, a directory" >&2; exit 2; }
        log=$(cd "$(dirname "$log")" && pwd)/$(basename "$log")  # (the base runs in its own tree)
        # shellcheck disable=SC2086
        {
            echo "== BASE_TREE $base"
            (cd "$base" && ULTRAMEM_GIT_REV=${BASE_REV:-unknown} PYTHONPATH=. $py -m perf.diagnostics.decode_aoti --layer-only --log "$log" ${DECODE_AOTI_ARGS:-}) ||
                echo "(the base tree's run failed: $?)"
            echo "== this tree"
            $py -m perf.diagnostics.decode_aoti --layer-only --log "$log" ${DECODE_AOTI_ARGS:-}
        } 2>&1 | tee "$out/decode_ab.txt"
        ;;
    layer-host)
        $py -m perf.diagnostics.layer_host_profile > "$out/layer_host.txt" 2>&1
        $py -m perf.diagnostics.layer_host_profile --staged > "$out/layer_host_staged.txt" 2>&1
        tail -n 40 "$out/layer_host.txt" "$out/layer_host_staged.txt"
        ;;
    *)
        echo "unknown PART $part: tests, ops, ab, ab-graphs, launchers, regions, options, stack, inputs, fsdp-inputs, fsdp-staged, decode, decode-aoti, decode-ab or layer-host" >&2
        exit 2
        ;;
esac
