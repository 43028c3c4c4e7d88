#!/bin/bash
# UNet-only sweep (scripts/tiny_unet_sweep.py) on a GPU machine of the device tool, one process per job, all at
# once. A job is a variant (VARIANTS, on the shipped CLIP and VAE) or, with BASES, one variant (the first of
# VARIANTS) on each of several frozen CLIP/VAE checkpoints (BASES=name=path,...; scripts/tiny_hybrid.py makes
# mixed ones). STEPS fixes the UNet steps (default: what a 55-minute 2-core run buys the variant), FRACTIONS where
# to judge. Each job writes its JSON lines to $OUT/<job>.jsonl (its stderr tail is printed); KEEP_MODELS=1 puts the judged UNets there.
set -u
VARIANTS=${VARIANTS:-sz,sz_rb2,sz_lr}
LIMIT=${LIMIT:-540}
FRACTIONS=${FRACTIONS:-0.5,1.0}
PER_COUNT=${PER_COUNT:-30}
STEPS=${STEPS:+--steps $STEPS}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
nvidia-smi -L
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
declare -A JOBS  # job name -> extra arguments
if [ -n "${BASES:-}" ]; then
    for pair in ${BASES//,/ }; do
        JOBS[${pair%%=*}]="--run ${VARIANTS%%,*} --base ${pair#*=} --out /tmp/unet-sweep/${pair%%=*}"
    done
else
    for v in ${VARIANTS//,/ }; do JOBS[$v]="--run $v --out /tmp/unet-sweep"; done
fi
for job in "${!JOBS[@]}"; do
    echo "== $job: ${JOBS[$job]}"
    PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 timeout $LIMIT python3 scripts/tiny_unet_sweep.py ${JOBS[$job]} $STEPS \
        --fractions $FRACTIONS --per-count $PER_COUNT --device cuda --threads 1 --eval-threads 4 \
        > $OUT/$job.jsonl 2> /tmp/$job.err &
done
wait
for job in "${!JOBS[@]}"; do echo "== $job"; tail -n 3 /tmp/$job.err; done
find /tmp/unet-sweep -name log.jsonl -exec sh -c 'echo "$1"; tail -n 2 "$1"' _ {} \;
head -n 50 $OUT/*.jsonl
if [ -n "${KEEP_MODELS:-}" ]; then  # the judged UNets come back too (16 MiB a file: the UNet alone), to judge again
    # or where time ran out: scripts/tiny_hybrid.py --unet puts one back on its frozen parts
    for f in $(find /tmp/unet-sweep -name 'tiny-sd-*.safetensors'); do
        python3 -c "import sys; from safetensors import safe_open; from safetensors.numpy import save_file
f = safe_open(sys.argv[1], 'np')
save_file({k: f.get_tensor(k) for k in f.keys() if k.startswith('model.diffusion_model.')}, sys.argv[2], metadata=f.metadata())" \
            "$f" "$OUT/$(echo "${f#/tmp/unet-sweep/}" | tr / - | sed 's/safetensors$/unet.safetensors/')"
    done
fi
