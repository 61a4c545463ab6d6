#!/bin/bash
# One-GPU call 2 of a pair (see README.md): SmolLM2 part b; the speed rows alone on the GPU first
# (their timings must not be shared), then the accuracy points as concurrent processes (exact
# match and log-likelihood do not depend on timing). kv.py saves after every policy and
# configuration, so a process cut by its timeout keeps what it measured.
source benchmarks/h200/smollm2_part_b.sh
END=${END:-575}
SPEED_S=${SPEED_S:-210}
[ "$SPEED_S" -gt 0 ] && timeout $SPEED_S python3 benchmarks/kv.py --out "$OUT/kv_speed" --skip accuracy --duo-gates $G \
  --speed-lengths ${SPEED_LENGTHS:-8192 32768 65536} --budget-s $((SPEED_S - 25)) $SPEED_ARGS > "$OUT/kv_speed.log" 2>&1
run_acc() {  # length mode batch [policies joined by +]
  local left=$((END - SECONDS)) pols=${4:-$POLICIES}
  [ "$left" -gt 20 ] || return
  timeout $left python3 benchmarks/kv.py --out "$OUT/kv_$1_$2${4:+_$4}" --lengths "$1" --modes "$2" --batch "$3" \
    --skip correctness speed --duo-gates $G --budget-s $((left * 10 / 6)) ${pols:+--policies ${pols//+/ }} \
    > "$OUT/kv_$1_$2${4:+_$4}.log" 2>&1
}
# POINTS: one process per entry, all at once; an entry is length:mode:batch[:policy+policy] (full
# always runs; POLICIES, space-separated, applies where an entry names none), or several such
# points joined by commas, run one after the other in that process.
for entry in ${POINTS:-4096:agnostic:25 2048:agnostic:50 2048:aware:50 1024:aware:50}; do
  (IFS=, read -ra chain <<< "$entry"
   for p in "${chain[@]}"; do
     IFS=: read -r len mode bs pols <<< "$p"
     run_acc "$len" "$mode" "$bs" "$pols"
   done) &
done
wait
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
