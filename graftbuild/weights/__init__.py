"""Model weights and models: streaming safetensors I/O, model folders, device placement, memory,
``-j`` parallelism, text data, generation and training."""
