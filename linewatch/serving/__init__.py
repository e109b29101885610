"""Scoring as a service: `linewatch serve` (PyTriton) and the native Triton model repository (`export`).

Torch-free. The naming and metadata contract a remote client checks lives in `linewatch.serving.repository`.
"""
