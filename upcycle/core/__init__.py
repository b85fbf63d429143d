"""Pieces every command uses: errors, console, tensors and dtypes, model and data loading, routing, kernels."""
