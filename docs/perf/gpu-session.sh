#!/usr/bin/env bash
# What a session with a lent GPU runs for issue 7, in stages that each fit
# one device call (10 minutes). Usage, on the device machine, in the repo
# root, with .whl (transformers 5 wheel; ref/: transformers 4.53 and its
# tokenizers and huggingface_hub), .reference (an EAGLE checkout) and .data (a
# copy of ../shared/data) carried: bash docs/perf/gpu-session.sh STAGE
# Logs and results go to $OUT; each step has its own time limit, so one that
# hangs or fails leaves the others' results. Stages 1-8 are the record of what
# ran (docs/perf/2026-11-23-h100*/ name the commits); `--freeze` (stages 4, 5)
# has since been removed from the benchmarks.
# A new checkout has none of the carried folders: make them first with
#   bash docs/perf/prepare-carry.sh EAGLE_GIT_DIR
# (about 10 s here; the header there says what each folder holds).
# A dry run of stage 11 on a CPU (no graphs there; it finds a broken argument or API):
#   python3 docs/perf/check_warm_up.py --device cpu --shape small --prompt-length 200 --max-length 300
set -u
stage=${1:?stage: 1 to 11}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pip_install /tmp/site .whl/*.whl || exit 1
pip_install /tmp/ref-site .whl/ref/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
log=$out/stage$stage.log

step() {  # step NAME SECONDS COMMAND...: run with a limit, log, summarise
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name: $*" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== $name: rc=$? after $((SECONDS - start)) s" | tee -a "$log"
}

# (commands, not shell functions: `timeout` runs programs)
overhead=(python3 -m eagle_gto.benchmarks.engine_overhead)
reference=(env PYTHONPATH=/tmp/ref-site:.reference:$PWD python3 -m eagle_gto.benchmarks.reference_engine)

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())'
} >>"$log" 2>&1

case $stage in
1)
    step graphs 150 "${overhead[@]}" --engines eager,graphs --total-tokens 60 --json "$out/graphs.json"
    step reference 100 "${reference[@]}" --total-tokens 60 --json "$out/reference.json"
    step parity 60 python3 -m eagle_gto.benchmarks.reference_parity --reference-path /tmp/ref-site:.reference \
        --device cuda --limit 3 --data-dir .data --reference-label "SafeAILab/EAGLE cb7e084" --json "$out/parity.json"
    ;;
2)
    step compiled 570 env TORCH_LOGS=recompiles "${overhead[@]}" --engines graphs --total-tokens 60 --compile --json "$out/compiled.json"
    ;;
3)
    step equality 200 python3 -m eagle_gto.benchmarks.gpu_equality --json "$out/equality.json"
    step equality-compiled 280 python3 -m eagle_gto.benchmarks.gpu_equality --compile --shape small \
        --json "$out/equality_compiled_small.json"
    ;;
4)  # after the compile fix: one set of layer graphs for all layers, eager prefill
    step compiled 160 "${overhead[@]}" --engines graphs --total-tokens 60 --compile --json "$out/compiled_fixed.json"
    step equality-compiled 140 python3 -m eagle_gto.benchmarks.gpu_equality --compile \
        --json "$out/equality_compiled.json"
    step frozen 100 "${overhead[@]}" --engines graphs --total-tokens 60 --compile --freeze --json "$out/frozen.json"
    ;;
5)  # next: the attention inside the compiled graphs (HEAD) against b5fbaa8 side by side, then --freeze.
    # Before the call, here: mkdir -p .old && git archive b5fbaa8 eagle_gto | tar -x -C .old
    # (and echo /.old/ >> .git/info/exclude); carry .old with the others.
    step compiled 150 "${overhead[@]}" --engines graphs --total-tokens 60 --compile --json "$out/compiled_head.json"
    step compiled-b5fbaa8 150 env -C .old PYTHONPATH=/tmp/site:$PWD/.old "${overhead[@]}" --engines graphs \
        --total-tokens 60 --compile --json "$out/compiled_b5fbaa8.json"
    step frozen 270 "${overhead[@]}" --engines graphs --total-tokens 60 --compile --freeze --json "$out/frozen.json"
    ;;
6)  # next: compiled equality in full (demo, 8B float32 and bfloat16)
    step equality-compiled 560 python3 -m eagle_gto.benchmarks.gpu_equality --compile --json "$out/equality_compiled.json"
    ;;
7)  # where the compiled iteration's GPU time goes (kernel by kernel), then max-autotune
    step profile 230 "${overhead[@]}" --engines graphs --total-tokens 60 --compile --profile 5 --json "$out/profile.json"
    step autotune 330 "${overhead[@]}" --engines graphs --total-tokens 60 --compile max-autotune-no-cudagraphs \
        --json "$out/autotune.json"
    ;;
8)  # the attention kernel: cuDNN's (torch's choice, 17 us a layer in stage 7) against the memory-efficient one
    step efficient 230 "${overhead[@]}" --engines graphs --total-tokens 60 --compile --sdpa-backend efficient \
        --profile 5 --json "$out/efficient.json"
    ;;
9)  # next: the two-round draft top-k and the greedy argmax without a float32 copy (predicted together about
    # -0.35 ms an iteration: 49cfdc3 against HEAD --unfused), and the stacked q/k/v and gate/up projections
    # (predicted about -0.4 ms an iteration, -0.2 to -0.4 ms a plain step: HEAD --unfused against HEAD), one run.
    # Before the call, here: rm -rf .old && mkdir .old && git archive 49cfdc3 eagle_gto | tar -x -C .old
    step parity 50 python3 -m eagle_gto.benchmarks.reference_parity --reference-path /tmp/ref-site:.reference \
        --device cuda --limit 3 --data-dir .data --reference-label "SafeAILab/EAGLE cb7e084" --json "$out/parity.json"
    step compiled 200 "${overhead[@]}" --engines graphs --total-tokens 60 --compile --profile 5 --json "$out/compiled.json"
    step compiled-unfused 150 "${overhead[@]}" --engines graphs --total-tokens 60 --compile --unfused \
        --json "$out/compiled_unfused.json"
    step compiled-49cfdc3 150 env -C .old PYTHONPATH=/tmp/site:$PWD/.old "${overhead[@]}" --engines graphs \
        --total-tokens 60 --compile --json "$out/compiled_49cfdc3.json"
    ;;
10)  # next: the attention as inductor's own kernels (math) against torch's choice (cuDNN)
    step math 170 "${overhead[@]}" --engines graphs --total-tokens 60 --compile --sdpa-backend math --profile 5 \
        --json "$out/math.json"
    ;;
11)  # next: after warm_up, generations to the end of the context record no new graph (compiled, small shape:
    # the graph keys do not depend on the width); a server's start-up (demo pair) with and without --torch-compile
    step warm-up 500 python3 docs/perf/check_warm_up.py --shape small --compile --server --json "$out/warm_up.json"
    ;;
esac
grep -h -A30 '^| what' "$log" | grep -v '^=== ' | tail -n 40

ls -la "$out"
