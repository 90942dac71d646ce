"""qtool: post-training quantization of language models."""
__version__ = "0.1.0"
