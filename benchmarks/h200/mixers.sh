#!/bin/bash
# passkey_h200, then what is left of mqar_h200, one process per GPU sharing a store per suite.
export PYTHONPATH=$PWD
S=${S:-230}
mkdir -p /root/persist
for g in 0 1 2 3; do
  # GPU 3 first times every mixer's training step (the fused Mamba scan and the memory core's
  # per-chunk work are new since the last run), then joins the suites.
  (if [ "$g" = 3 ]; then CUDA_VISIBLE_DEVICES=3 timeout 200 python3 benchmarks/mixers_throughput.py \
     --out "$OUT/throughput" --time-budget 150; fi
   CUDA_VISIBLE_DEVICES=$g timeout $((S + 200)) python3 -m memlab run passkey_h200 \
     --store /root/persist/passkey.sqlite --no-progress --stop-after "$S"
   CUDA_VISIBLE_DEVICES=$g timeout 120 python3 -m memlab run mqar_h200 \
     --store /root/persist/mqar.sqlite --no-progress --stop-after 5) > "$OUT/mixers_g$g.log" 2>&1 &
  sleep 2
done
wait
cp /root/persist/*.sqlite "$OUT/" 2>/dev/null
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
