#!/bin/bash
# One-GPU call 2 of a pair (see README.md): SmolLM2 part b; the speed rows alone on the GPU first
# (their timings must not be shared), then the accuracy points as concurrent processes (exact
# match and log-likelihood do not depend on timing). kv.py saves after every policy and
# configuration, so a process cut by its timeout keeps what it measured.
source benchmarks/h200/smollm2_part_b.sh
END=${END:-575}
SPEED_S=${SPEED_S:-210}
[ "$SPEED_S" -gt 0 ] && timeout $SPEED_S python3 benchmarks/kv.py --out "$OUT/kv_speed" --skip accuracy --duo-gates $G \
  --speed-lengths ${SPEED_LENGTHS:-8192 32768 65536} --budget-s $((SPEED_S - 25)) > "$OUT/kv_speed.log" 2>&1
LEFT=$((END - SECONDS))
run_acc() {  # length mode batch
  timeout $LEFT python3 benchmarks/kv.py --out "$OUT/kv_$1_$2" --lengths "$1" --modes "$2" --batch "$3" \
    --skip correctness speed --duo-gates $G --budget-s $((LEFT * 10 / 6)) ${POLICIES:+--policies $POLICIES} \
    > "$OUT/kv_$1_$2.log" 2>&1
}
# POINTS: length:mode:batch, one process each; POLICIES: a subset of policies (full always runs)
for p in ${POINTS:-4096:agnostic:25 2048:agnostic:50 2048:aware:50 1024:aware:50}; do
  IFS=: read -r len mode bs <<< "$p"
  run_acc "$len" "$mode" "$bs" &
done
wait
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
