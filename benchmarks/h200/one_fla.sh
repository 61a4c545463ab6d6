#!/bin/bash
# One-GPU call: the fla peer alone on the GPU (issue 2). fla layers listed in FLA_KINDS (spaces or
# commas; default LinearAttention only: fla's Mamba runs a per-token slow path and Mamba2 ran out
# of memory), each in a child process killed after VARIANT_S, then the shared MQAR configuration.
# FLA_ARGS: more arguments for mixers_fla.py, e.g. "--only mqar". Triton's cache (compiled kernels
# and fla's autotuning results) goes to $OUT/triton_cache.tgz; carried back as .tcache, a later
# call would skip the ~200 s cold autotune, but at 19 MB it is over the size a call brings back.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla_site .whl/fla/*.whl
export TRITON_CACHE_DIR=/root/triton_cache
mkdir -p $TRITON_CACHE_DIR
[ -f .tcache/triton_cache.tgz ] && tar xzf .tcache/triton_cache.tgz -C $TRITON_CACHE_DIR
T=${T:-480}
PYTHONPATH=$PWD:/tmp/fla_site timeout "$T" python3 benchmarks/mixers_fla.py --variant-s ${VARIANT_S:-260} \
  --fla-kinds "$(echo ${FLA_KINDS:-linear_attention} | tr " " ",")" --out "$OUT/fla" --budget-s $((T - 60)) $FLA_ARGS \
  > "$OUT/fla.log" 2>&1
tail -25 "$OUT/fla.log"
tar czf "$OUT/triton_cache.tgz" -C $TRITON_CACHE_DIR . && du -sh "$OUT/triton_cache.tgz"
