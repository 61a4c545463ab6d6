"""Kernels: each op folder holds reference.py (the PyTorch specification), Triton modules and an
``__init__.py`` with the public functions, dispatch, autograd and input checks. Ops import only
torch and (lazily) triton."""
