"""Triton kernels of fastflow, installed as `fastflow.kernels`.

Pure functions over tensors (no nn.Modules), one module per op family; imported lazily by
`fastflow.ops`, never by `import fastflow`, so Triton is only loaded when a Triton backend runs.
"""


def next_power_of_2(n: int) -> int:
    """Smallest power of 2 >= n (n >= 1); plain Python: `triton.next_power_of_2` costs microseconds per call."""
    return 1 << (n - 1).bit_length()


def dot_tile(n: int) -> int:
    """Power-of-2 tile width >= 16 (tl.dot's minimum) holding n."""
    return max(16, next_power_of_2(n))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (a launch grid)."""
    return -(-a // b)


def row_major(x):
    """x `(N, C)` with contiguous columns: a view as it is (its rows any stride apart, e.g. a column slice
    of a wider tensor), else a contiguous copy."""
    return x if x.stride(1) == 1 else x.contiguous()
