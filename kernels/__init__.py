"""Triton kernels of fastflow, installed as `fastflow.kernels`.

Pure functions over tensors (no nn.Modules), one module per op family; imported lazily by
`fastflow.ops`, never by `import fastflow`, so Triton is only loaded when a Triton backend runs.
"""
