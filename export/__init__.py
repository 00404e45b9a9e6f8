"""far-export: FAR checkpoints -> ONNX bundles -> TensorRT engines."""
