"""Offline measurement (torch-free unless scoring with the torch model): exact metrics, datasets, eval, bench."""
