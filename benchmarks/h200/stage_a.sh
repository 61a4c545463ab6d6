#!/bin/bash
# Call 1 of a pair (see README.md): stage SmolLM2 part a; titans peer (GPU 0), fla peer throughput
# (GPU 1) and MQAR (GPU 2), mqar_h200 reruns (GPU 3).
mkdir -p /root/persist && cp .xfer/a/* /root/persist/
P="python3 -m pip install -q --no-index --no-deps --no-compile --target"
$P /tmp/fla_site .whl/fla/*.whl
$P /tmp/titans_site .whl/titans/*.whl .whl/fla/einops-*.whl
T=${T:-300}
# The mqar_h200 rows to measure again: the memory mixers (stability fix, leaner per-chunk update)
# and the two Mamba scans (now the fused Triton scan on CUDA); the other rows stand.
MQAR_RERUN=titans,moneta,yaad,memora,mamba
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD:/tmp/titans_site timeout "$T" python3 benchmarks/titans_peer.py \
  --out "$OUT/titans" --train-budget "${TITANS_BUDGET:-100}" > "$OUT/titans.log" 2>&1 &
# Each fla variant runs in its own process, killed after --variant-s (fla's Based layer never returned).
for part in throughput:1 mqar:2; do
  CUDA_VISIBLE_DEVICES=${part#*:} PYTHONPATH=$PWD:/tmp/fla_site timeout "$T" python3 benchmarks/mixers_fla.py \
    --only "${part%:*}" --variant-s 180 --out "$OUT/fla_${part%:*}" --budget-s $((T - 45)) \
    > "$OUT/fla_${part%:*}.log" 2>&1 &
done
CUDA_VISIBLE_DEVICES=3 PYTHONPATH=$PWD timeout "$T" python3 -m memlab run mqar_h200 --filter "$MQAR_RERUN" \
  --store /root/persist/mqar.sqlite --no-progress --stop-after $((T - 115)) > "$OUT/mqar_g3.log" 2>&1 &
wait
cp /root/persist/mqar.sqlite "$OUT/" 2>/dev/null
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
