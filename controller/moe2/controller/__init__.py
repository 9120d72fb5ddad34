"""moe2 controller: the control plane behind ``moe2ctl``."""

__version__ = "0.1.0"
