"""rdna4-install: vLLM on AMD RDNA4 GPUs, built natively for gfx1200/gfx1201."""

__version__ = "0.1.0"
