#!/usr/bin/env bash
# The GPU measurements of one device call (`device` tool), by stage: bash bench/gpu_session.sh STAGE...
# Installs the carried wheelhouse (.whl, from ../shared/tools/gpu-wheels.sh) once per machine and
# writes each stage's table to $OUT/<stage>.md and its log to $OUT/<stage>.log.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ ! -d /tmp/site/optuna ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PWD_REPO=$PWD
# the study of `study`: small GPT-2 and Transformer++ variants at T = 1024, 3-minute trials whose
# first rung (of successive halving) falls after 60 s of training
STUDY_ARGS=${STUDY_ARGS:-"--set d_model=384 --set n_layer=4 --set n_head=12 --set micro_batch=32 \
--set batch_tokens=65536 --budget 20m --trial-budget 3m --evals 3 --study gpu20"}
# the GPT-2 ranks cannot be downloaded there: carry them as .whl/gpt2.tiktoken (cp from
# ~/.cache/lm-playground/tokenizers/ after `python -m search.tokenizer install` here)
if [ -f .whl/gpt2.tiktoken ]; then
  python3 -m search.tokenizer install --from .whl/gpt2.tiktoken > /dev/null || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
python3 -c "import torch, triton, liger_kernel; print('torch', torch.__version__, 'triton', triton.__version__)"
git log -1 --format='git %h %s' 2>/dev/null | cut -c1-80
stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S))"
  mkdir -p /tmp/logs; timeout "$limit" "$@" > "/tmp/logs/$name.log" 2>&1; local rc=$?
  grep -E '^\||^row |^[0-9]+ (passed|failed)|passed|failed|Error' "/tmp/logs/$name.log" | grep -v '^E ' | tail -40
  tar czf "$OUT/logs.tgz" -C /tmp/logs .   # one file for every log: at most 8 files come back
  echo "== $name rc=$rc ($(date -u +%H:%M:%S))"
}
copy_db() {  # the study's optuna.db, consistent while the study writes it (SQLite's backup)
  python3 -c "import sqlite3; sqlite3.connect('/tmp/study/optuna.db').backup(sqlite3.connect('$OUT/optuna.db'))" 2>/dev/null
}
for s in "$@"; do
  case $s in
    ops)    stage ops 120 python3 -m search.bench_ops --batch 16,32 --write "$OUT/ops.md" ;;
    hyper)  # issue 10: DHC at n = 4, torch against our fused kernels (hc_impl=triton)
      stage hyper 300 python3 -m search.bench --compile regional --batch 16 --no-twins --no-warm \
        --baseline llama --models llama,hyper,hyper+hc_impl=triton \
        --together --write "$OUT/hyper.md" ;;
    kernels-gpu) # issue 10 when device time is short: the fused kernels' GPU tests alone (compiled bf16 models)
      stage kernels-gpu 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_hyper_kernels.py ;;
    kernels) # issue 10: the fused kernels compiled for the GPU, every test of theirs (parity on CUDA)
      stage kernels 240 python3 -m pytest -q -p no:cacheprovider tests/test_hyper_kernels.py
      stage hc-ops 240 python3 -m bench.hc_kernels ;;
    tests)  stage tests 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_liger.py tests/test_ngpt.py tests/test_hyper.py tests/test_hyper_kernels.py tests/test_attention.py ;;
    one)    # everything one call can hold: issues 4, 6 and 9 in two interleaved processes, then the chunked loss's memory test
      stage one 330 python3 -m search.bench --together --compile regional --batch 16,32 --warm-only gpt2,llama \
        --models gpt2,gpt2@ce,llama,llama@ce,ngpt,ngpt@chunked --write "$OUT/one.md"
      stage two 170 python3 -m search.bench --together --compile regional --batch 16,32 --no-twins --no-warm \
        --models gpt2,gpt2@liger,llama,llama@auto,llama@liger --write "$OUT/two.md"
      stage memtest 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_liger.py -k "memory or tied" ;;
    final)  # issues 4 and 6: the graphs (fused loss by default) against their twins and their head + CE form, and nGPT
      stage final 290 python3 -m search.bench --together --compile regional --batch 16,32 --warm-only gpt2 \
        --models gpt2,gpt2@ce,llama,llama@ce,ngpt --write "$OUT/final.md" ;;
    ngpt)   # issue 6 alone: nGPT against the gpt2 graph, each loss form
      stage ngpt 200 python3 -m search.bench --together --compile regional --batch 16,32 --no-twins --no-warm \
        --models gpt2,gpt2@ce,ngpt,ngpt@chunked --write "$OUT/ngpt.md" ;;
    min)    # issues 4 and 6 when little device time is left: the graphs against their twins and nGPT
      stage min 250 python3 -m search.bench --together --compile regional --batch 16,32 --no-warm \
        --models gpt2,llama,ngpt --write "$OUT/min.md" ;;
    window) # attention: a sliding window through SDPA's dense mask (auto) against Flex's block mask, and a softcap (Flex)
      A=llama+nodes.layers.body.attn
      stage window 240 python3 -m search.bench --compile regional --batch 16 --no-twins --no-warm \
        --baseline llama --models "llama,$A.window=256,$A.window=256+$A.kernel=flex,$A.softcap=50.0" \
        --together --write "$OUT/window.md" ;;
    hc-profile) # issue 10: where DHC's step goes with the torch connections and with our kernels
      stage hc-profile 200 python3 -m bench.profile_step hyper hyper+hc_impl=triton --batch 16 --top 30 ;;
    profile) stage profile 240 python3 -m bench.profile_step gpt2 ngpt hyper --batch 16 --top 30 ;;
    study)  # issue 5: the 20-minute study, detached so that it outlives this call; `poll` follows it.
      # The process writes its own pid: under the device's job control setsid forks, and $! would
      # name a process that is gone at once (run 9: a poll saw "ended" while the study ran on).
      if [ -e /tmp/study/pid ] && kill -0 "$(cat /tmp/study/pid)" 2>/dev/null; then
        echo "== a study is still running (pid $(cat /tmp/study/pid)): poll it"; continue
      fi
      # The subshell execs setsid rather than waiting for it, and the study closes every inherited
      # descriptor above 2: a bash that waited for the study held this script's output pipe (and
      # whatever else it had open), so a pipeline (`| tee`) waited for the study too (tested
      # here; run 10's first device call ran to its limit so).
      mkdir -p /tmp/study
      (cd /tmp/study && PYTHONPATH="$PWD_REPO${PYTHONPATH:+:$PYTHONPATH}" exec setsid nohup \
        bash -c 'for f in /proc/$$/fd/*; do n=${f##*/}; if [ "$n" -gt 2 ] && [ -e "$f" ]; then eval "exec $n>&-"; fi; done
          echo $$ > /tmp/study/pid; exec python3 -m search.run "$@"' study \
        "$PWD_REPO/graphs/gpt2.yaml" "$PWD_REPO/graphs/llama.yaml" $STUDY_ARGS \
        > /tmp/study/study.log 2>&1 < /dev/null) &
      sleep 2; echo "== study started $(date -u +%H:%M:%S), pid $(cat /tmp/study/pid): $STUDY_ARGS" ;;
    poll*|until*)  # poll<SECONDS>: wait for the detached study (at most SECONDS), then bring back its state;
      # until<SECONDS>: the same, up to SECONDS after this script began (a call's limit is fixed)
      case $s in poll*) end=$((SECONDS + ${s#poll})) ;; *) end=${s#until} ;; esac
      while [ $SECONDS -lt $end ] && kill -0 "$(cat /tmp/study/pid)" 2>/dev/null; do
        sleep 5; cp /tmp/study/study.log "$OUT/study.log" 2>/dev/null
        # a consistent copy of the live study now and then, in case the call is cut
        [ $((SECONDS % 60)) -lt 5 ] && copy_db
      done
      kill -0 "$(cat /tmp/study/pid)" 2>/dev/null && echo "== study still running" || echo "== study ended"
      cp /tmp/study/study.log "$OUT/" 2>/dev/null
      copy_db
      cp -r /tmp/study/studies "$OUT/" 2>/dev/null; tail -40 /tmp/study/study.log ;;
    *) echo "unknown stage $s" ;;
  esac
done
