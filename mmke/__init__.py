"""mmke: a Hydra-driven harness that reproduces multimodal knowledge-editing research."""

__version__ = "0.1.0"
