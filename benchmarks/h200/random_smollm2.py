"""Save a randomly initialised model of SmolLM2-135M's shape to DIR (memory diagnosis needs no weights).

    python benchmarks/h200/random_smollm2.py DIR [--layers N]
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=30)
a = p.parse_args()
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=a.layers,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  rope_theta=100000.0, tie_word_embeddings=True)
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(a.out)
