"""duosparse: activity x weight sparsity sweeps for recurrent language models."""

__version__ = "0.1.0"
