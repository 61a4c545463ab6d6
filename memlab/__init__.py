"""memlab: memory in attention.

Makes attention use less memory (kernels, KV-cache policies, quantization) and gives models
more memory (memory-augmented sequence mixers), and measures both on the same work.
"""

__version__ = "0.1.0"
