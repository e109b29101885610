"""linewatch: DFR line inspection.

Build side in `linewatch.training` and `linewatch.export` (torch); everything else is the torch-free runtime.
"""

__version__ = "0.1.0"
