"""imnet: a distributed ImageNet trainer for normalization research."""

__version__ = "0.1.0"
