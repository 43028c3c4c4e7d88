#!/bin/bash
# The tiny-model design sweep on a GPU machine (the device tool): variants of scripts/tiny_sweep.py, replaying the
# step counts a 55-minute 2-core run buys each (bench/tiny_step_times.json). One at a time by default: eight at
# once on one H200 (PARALLEL=1) reached only ~1,400 of ~7,000 UNet steps each in 520 s (eval/training.md), since
# these small kernels are launch-bound and the GPU time-slices between processes.
# Results land in $OUT/results.jsonl (one line per finished variant) and $OUT/progress.txt.
set -u
VARIANTS=${VARIANTS:-base,neg}
PARALLEL=${PARALLEL:-0}
LIMIT=${LIMIT:-520}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
nvidia-smi -L
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
# a few steps of every phase on the GPU first: a broken device path costs seconds, not the whole call
timeout 120 python3 scripts/tiny_sweep.py --run neg --minutes 0.05 --device cuda --per-count 1 --out /tmp/smoke \
    || exit 1
for v in ${VARIANTS//,/ }; do
    PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 timeout $LIMIT python3 scripts/tiny_sweep.py --run $v --device cuda \
        --threads 1 --out /tmp/sweep >> $OUT/results.jsonl 2> /tmp/err_$v.txt &
    [ "$PARALLEL" = 1 ] || wait
done
wait
for v in ${VARIANTS//,/ }; do
    echo "== $v"; tail -n 3 /tmp/err_$v.txt; tail -n 2 /tmp/sweep/$v/log.jsonl 2>/dev/null
done > $OUT/progress.txt
cat $OUT/progress.txt
cat $OUT/results.jsonl
