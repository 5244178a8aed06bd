"""Exchange with other tools: ONNX export, PyTorch/safetensors weights, image files."""
