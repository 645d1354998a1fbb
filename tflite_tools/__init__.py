"""TFLite (LiteRT) export and latency benchmark tools (issue 5)."""
