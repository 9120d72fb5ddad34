"""Parts of moe2 that edge agents and the controller must agree on."""

__version__ = "0.1.0"
