"""ONNX export, INT8 quantization, latency benchmark and int8 inspection tools."""
