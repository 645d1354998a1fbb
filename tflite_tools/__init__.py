"""TFLite (LiteRT) export and latency benchmark tools."""
