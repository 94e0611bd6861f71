"""Triton kernels for the paths where PyTorch's own ops cost too many launches or passes (CUDA only).

Each kernel has a plain PyTorch reference elsewhere in the engine; `selfcheck.run_all()` compares them on a GPU.
"""
