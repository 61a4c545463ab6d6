#!/bin/bash
# One-GPU call, no carry: the first GPU compile of memlab's fused Taylor kernel (its tests on
# CUDA), then mixer training throughput beside attention in one process: every row by default
# (the table in docs/results.md predates the fused scan and Taylor kernels), or the rows in ROWS.
# Among them `based` (the fused kernel) against `based chunked` (the PyTorch chunked form), and
# the memory mixers eager against `mem_compile` (torch.compile of each chunk's read and update).
export PYTHONPATH=$PWD
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/ops/test_taylor.py tests/mixers/test_based.py \
  > "$OUT/taylor_tests.log" 2>&1
tail -4 "$OUT/taylor_tests.log"
eval "set -- ${ROWS:+--only $ROWS}"
timeout $((${END:-570} - SECONDS)) python3 benchmarks/mixers_throughput.py --out "$OUT/throughput" \
  --time-budget $((${END:-570} - 90 - SECONDS)) "$@" > "$OUT/throughput.log" 2>&1
tail -30 "$OUT/throughput.log"
(cd "$OUT" && tar czf results.tgz --exclude=results.tgz .)
