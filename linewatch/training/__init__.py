"""Build side (torch): backbone, regional generator, CAE, training. The runtime never imports this package."""
