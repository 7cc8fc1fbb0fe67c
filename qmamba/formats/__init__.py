"""On-disk formats of quantized models: compressed-tensors (what transformers and vLLM load) plus
qmamba's extension (the SSM state scheme and the mixer-internal quantizers, which other loaders
ignore). See docs/checkpoint-format.md."""
