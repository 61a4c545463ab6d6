#!/bin/bash
# One-GPU call: the fla peer alone on the GPU (issue 2). fla layers listed in FLA_KINDS (default:
# LinearAttention only; its Mamba runs a per-token slow path, Mamba2 ran out of memory, and Based
# never returned), each in a child process killed after VARIANT_S, then the shared MQAR
# configuration. Triton's cache (compiled kernels and, through fla's cache_results, autotuning
# results) goes to $OUT/triton_cache.tgz; carried back as .tcache, a later call skips the ~200 s
# cold autotune.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla_site .whl/fla/*.whl
export TRITON_CACHE_DIR=/root/triton_cache
mkdir -p $TRITON_CACHE_DIR
[ -f .tcache/triton_cache.tgz ] && tar xzf .tcache/triton_cache.tgz -C $TRITON_CACHE_DIR
T=${T:-480}
PYTHONPATH=$PWD:/tmp/fla_site timeout "$T" python3 benchmarks/mixers_fla.py --variant-s ${VARIANT_S:-260} \
  --fla-kinds "$(echo ${FLA_KINDS:-linear_attention} | tr " " ",")" --out "$OUT/fla" --budget-s $((T - 60)) > "$OUT/fla.log" 2>&1
tail -25 "$OUT/fla.log"
tar czf "$OUT/triton_cache.tgz" -C $TRITON_CACHE_DIR . && du -sh "$OUT/triton_cache.tgz"
