"""Work items of the inverse index in one launch (see nsa_ext/inverse_index.py).

One program walks the buckets' CSR offsets CHUNK buckets at a time with a running carry: per
bucket n = ceil(count / per_item) items, first item = carry + exclusive prefix sum of n; it
writes each bucket's (first_item, num_items) and each item's (bucket, start, end), then marks
the unused items past the end (bucket = num_buckets). Sequential over chunks on purpose: the
arrays are small (one entry per bucket and per item) and one launch replaces twenty small
PyTorch ops whose host cost dominated the index's build.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def work_items_kernel(offsets, first_item, num_items, item_bucket, item_start, item_end,
                      num_buckets, max_items, per_item, CHUNK: tl.constexpr):
    o = tl.arange(0, CHUNK)
    carry = tl.full([], 0, tl.int64)
    for c0 in range(0, num_buckets, CHUNK):
        b = c0 + o
        m = b < num_buckets
        lo = tl.load(offsets + b, mask=m, other=0)
        hi = tl.load(offsets + b + 1, mask=m, other=0)
        n = (hi - lo + per_item - 1) // per_item
        first = carry + tl.cumsum(n, 0) - n
        tl.store(first_item + b, first, mask=m)
        tl.store(num_items + b, n, mask=m)
        for kk in range(0, tl.max(n, 0)):
            mk = m & (kk < n)
            start = lo + kk * per_item
            tl.store(item_bucket + first + kk, b, mask=mk)
            tl.store(item_start + first + kk, start, mask=mk)
            tl.store(item_end + first + kk, tl.minimum(start + per_item, hi), mask=mk)
        carry += tl.sum(n, 0)
    for i0 in range(carry, max_items, CHUNK):
        i = i0 + o
        m = i < max_items
        tl.store(item_bucket + i, num_buckets + 0 * i, mask=m)
        tl.store(item_start + i, 0 * i, mask=m)
        tl.store(item_end + i, 0 * i, mask=m)
