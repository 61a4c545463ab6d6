#!/bin/bash
# One-GPU call 1 of a pair (see README.md): stage SmolLM2 part a, then the fla peer alone on the GPU
# (layer throughput, then the shared MQAR configuration), so that no other job shares its timings.
mkdir -p /root/persist && cp .xfer/a/* /root/persist/
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla_site .whl/fla/*.whl
T=${T:-330}
# Each fla variant runs in its own process, killed after --variant-s (fla's Based layer never returned).
PYTHONPATH=$PWD:/tmp/fla_site timeout "$T" python3 benchmarks/mixers_fla.py --variant-s 180 \
  --out "$OUT/fla" --budget-s $((T - 35)) > "$OUT/fla.log" 2>&1
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
