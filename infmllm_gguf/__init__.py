"""infmllm-gguf."""
