"""The model: where it comes from (`source`, torch-free: the driver and `submit` use it), how a replica loads
(`load`), and its tokenizer."""
