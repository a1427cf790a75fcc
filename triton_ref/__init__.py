"""Triton kernels of nsa_ext. `selection_fwd.py`: the selection-attention forward kernels
(group-centric and per-head) and their launcher `selection_fwd.selection_fwd`.

Importing the kernel module needs Triton; nsa_ext imports it lazily, from its Triton backend only.
"""
