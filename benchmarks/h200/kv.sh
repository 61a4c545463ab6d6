#!/bin/bash
# Call 2 of a pair (see README.md): SmolLM2 part b, then kv.py split over the GPUs.
# kv.py saves after every policy (accuracy) and every configuration (speed), so a process killed
# by its timeout keeps what it measured. The kvpress comparison ran on the CPU (identical answers
# in all 12 cells): this call's GPU time goes to the points still missing.
source benchmarks/h200/smollm2_part_b.sh
LEFT=$((${END:-575} - SECONDS))  # seconds left in this call for the measuring processes
run_acc() {  # gpu length mode batch
  CUDA_VISIBLE_DEVICES=$1 timeout $LEFT python3 benchmarks/kv.py --out "$OUT/kv_$2_$3" --lengths "$2" \
    --modes "$3" --batch "$4" --skip correctness speed --duo-gates $G --budget-s $((LEFT * 10 / 6 - 100)) \
    > "$OUT/kv_$2_$3.log" 2>&1
}
run_acc 0 4096 agnostic 25 & run_acc 0 1024 aware 50 &
run_acc 1 4096 aware 25 & run_acc 1 1024 agnostic 50 &
run_acc 2 2048 agnostic 50 & run_acc 2 2048 aware 50 &
CUDA_VISIBLE_DEVICES=3 timeout $LEFT python3 benchmarks/kv.py --out "$OUT/kv_speed" --skip accuracy \
  --duo-gates $G --budget-s $((LEFT - 30)) > "$OUT/kv_speed.log" 2>&1 &
wait
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
