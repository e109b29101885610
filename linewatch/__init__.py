"""linewatch: DFR line inspection. Build side in `linewatch.build` (torch); everything else is the torch-free runtime."""

__version__ = "0.1.0"
