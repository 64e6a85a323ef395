"""Measurement harness: accuracy, FLOPs, latency, spectral bias and scaling of token reducers."""
