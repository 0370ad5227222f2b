"""Fused ops: each module holds the PyTorch reference, the dispatch and the autograd wrapper of one op."""
