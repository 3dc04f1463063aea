"""vidgen: train video generators on Ray + DeepSpeed, render video batches into object storage."""

__version__ = "0.1.0"
