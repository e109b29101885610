"""Export step (build side, torch): fuse VGG19 + regional generator + CAE into one ONNX graph."""
