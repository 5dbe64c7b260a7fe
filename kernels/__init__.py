"""Triton kernels of seqpar, installed as ``seqpar.kernels``.

Each kernel has a pure-PyTorch reference in ``seqpar`` that the tests compare
against; the reference is also the CPU path.
"""
