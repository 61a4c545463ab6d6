#!/bin/bash
# One-GPU call: the passkey_h200 runs that predate the memory mixers' stability fix, then the
# mqar_h200 reruns, as PROCS processes sharing the GPU and one store per suite. Training is capped
# in seconds (max_train_s), so processes sharing the GPU train fewer steps: the stored steps and
# epochs say how far each run got, and the report shows them. Timeouts count back from END.
# PASSKEY=none skips the passkey runs. The default filter also takes the suite's `... compiled` rows.
export PYTHONPATH=$PWD
END=${END:-560}
PROCS=${PROCS:-3}
PASSKEY=${PASSKEY:-titans,moneta,yaad,memora,attention,landmark}
MQAR=${MQAR:-titans,moneta,yaad,memora,mamba}
mkdir -p /root/persist
for i in $(seq 1 "$PROCS"); do
  (if [ "$PASSKEY" != none ]; then
     timeout $((END - 15 - SECONDS)) python3 -m memlab run passkey_h200 --filter "$PASSKEY" \
       --store /root/persist/passkey.sqlite --no-progress --stop-after $((END - 215 - SECONDS))
   fi
   if [ $((END - SECONDS)) -gt 130 ]; then
     timeout $((END - 10 - SECONDS)) python3 -m memlab run mqar_h200 --filter "$MQAR" \
       --store /root/persist/mqar.sqlite --no-progress --stop-after 5
   fi) > "$OUT/mixers_p$i.log" 2>&1 &
  sleep 2
done
wait
cp /root/persist/*.sqlite "$OUT/" 2>/dev/null
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
