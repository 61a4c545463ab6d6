#!/bin/bash
# One-GPU call, nothing to stage: where does the decoding-phase memory of kv.py's speed rows come
# from (DELTA 5.3 GB at 8k against a 296 MiB prefill; docs/results.md)? Three steps, each a
# narrower copy of kv.py's speed loop on a randomly initialised model of SmolLM2's shape:
# 1. kv.py itself (transformers baseline, warm-up pass, 36 steps per configuration) at 8k: its
#    rows now carry decode_peak_over_start_bytes, the decoding steps' own peak;
# 2. if step 1 shows the excess: the same with --memory-history, which says where the blocks at
#    the peak were allocated (about 100x slower steps: one length only);
# 3. kv_decode_memory.py with as many steps as kv.py (36), without kv.py's surroundings.
# With DECODE_MEMORY_STAGE=1 it first copies SmolLM2 part a to /root/persist (call 1 of a pair).
export PYTHONPATH=$PWD
[ -n "$DECODE_MEMORY_STAGE" ] && mkdir -p /root/persist && cp .xfer/a/* /root/persist/
G=benchmarks/results/duo_gates_smollm2-135m.safetensors
python3 benchmarks/h200/random_smollm2.py /tmp/rand_smol > /dev/null 2>&1
# The three steps run as concurrent processes: each measures its own process's allocations, and
# none of their timings is used (step 2's stack capture slows its steps anyway).
timeout 200 python3 benchmarks/kv.py --out "$OUT/plain" --skip accuracy correctness --model /tmp/rand_smol \
  --speed-lengths 8192 --duo-gates $G --budget-s 170 > "$OUT/plain.log" 2>&1 &
timeout 250 python3 benchmarks/kv.py --out "$OUT/history" --skip accuracy correctness --model /tmp/rand_smol \
  --speed-lengths 8192 --duo-gates $G --budget-s 220 --memory-history > "$OUT/history.log" 2>&1 &
timeout 150 python3 benchmarks/kv_decode_memory.py --out "$OUT/alone" --length 8192 --steps 36 --no-history \
  --policies full,streaming,h2o,delta > "$OUT/alone.log" 2>&1 &
wait
show() {
  python3 - "$1" <<'PY'
import json, sys
for k, v in json.load(open(sys.argv[1])).get("speed", {}).items():
    if "decode_ms" not in v:
        continue
    mib = lambda key: (v.get(key) or 0) >> 20
    print(k, "prefill peak", mib("peak_prefill_bytes"), "decoding peak above start", mib("decode_peak_over_start_bytes"),
          "growth", mib("decode_growth_bytes"), "MiB")
    for b in v.get("decode_peak_blocks", [])[:4]:
        print("   ", b["bytes"] >> 20, "MiB", " < ".join(b["frames"][:4]))
PY
}
show "$OUT/plain/kv.json"
show "$OUT/history/kv.json"
cat "$OUT/alone.log"
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
