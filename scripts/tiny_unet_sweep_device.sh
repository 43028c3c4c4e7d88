#!/bin/bash
# UNet-only sweep (scripts/tiny_unet_sweep.py) on a GPU machine of the device tool: the variants run in parallel,
# each replaying the UNet steps a 55-minute 2-core run buys it, on the shipped tiny CLIP and VAE. Each writes a
# JSON line at half and at all of its steps to $OUT/<variant>.jsonl.
set -u
VARIANTS=${VARIANTS:-sz,sz_rb2,sz_lr}
LIMIT=${LIMIT:-540}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
nvidia-smi -L
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
for v in ${VARIANTS//,/ }; do
    PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 timeout $LIMIT python3 scripts/tiny_unet_sweep.py --run $v --device cuda \
        --threads 1 --eval-threads 4 --out /tmp/unet-sweep > $OUT/$v.jsonl 2> $OUT/$v.err &
done
wait
for v in ${VARIANTS//,/ }; do echo "== $v"; tail -n 3 $OUT/$v.err; tail -n 2 /tmp/unet-sweep/$v/log.jsonl; done
cat $OUT/*.jsonl
