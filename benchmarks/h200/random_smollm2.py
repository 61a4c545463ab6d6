"""Save a randomly initialised model of SmolLM2-135M's shape to DIR (memory diagnosis needs no weights).

    python benchmarks/h200/random_smollm2.py DIR [--layers N]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kv_decode_memory import smollm2_shaped  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--layers", type=int, default=30)
a = p.parse_args()
smollm2_shaped(torch.device("cpu"), torch.bfloat16, 8192, a.layers).save_pretrained(a.out)
