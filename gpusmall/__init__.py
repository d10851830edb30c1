"""gpusmall: GPU-batched event-by-event reduction of X-ray area detector data ('small data')."""

__version__ = "0.1.0"
