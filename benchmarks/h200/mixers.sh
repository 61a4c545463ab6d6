#!/bin/bash
# passkey_h200, then what is left of the mqar_h200 reruns, one process per GPU sharing a store
# per suite. Every timeout counts back from END, so the call ends (and packs) within 600 s.
export PYTHONPATH=$PWD
END=${END:-575}
MQAR_RERUN=titans,moneta,yaad,memora,mamba
mkdir -p /root/persist
for g in 0 1 2 3; do
  # GPU 3 first times every mixer's training step (the fused Mamba scan and the memory core's
  # per-chunk work are new since the last run), then joins the suites.
  (if [ "$g" = 3 ]; then CUDA_VISIBLE_DEVICES=3 timeout 200 python3 benchmarks/mixers_throughput.py \
     --out "$OUT/throughput" --time-budget 150; fi
   # a passkey run takes up to ~200 s (train 90 s + tests to 32k), an mqar run ~100 s
   CUDA_VISIBLE_DEVICES=$g timeout $((END - 15 - SECONDS)) python3 -m memlab run passkey_h200 \
     --store /root/persist/passkey.sqlite --no-progress --stop-after $((END - 215 - SECONDS))
   if [ $((END - SECONDS)) -gt 130 ]; then
     CUDA_VISIBLE_DEVICES=$g timeout $((END - 10 - SECONDS)) python3 -m memlab run mqar_h200 \
       --filter "$MQAR_RERUN" --store /root/persist/mqar.sqlite --no-progress --stop-after 5
   fi) > "$OUT/mixers_g$g.log" 2>&1 &
  sleep 2
done
wait
cp /root/persist/*.sqlite "$OUT/" 2>/dev/null
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
