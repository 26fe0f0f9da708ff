"""scenec: a declarative scene-spec compiler for controllable diffusion image generation."""

__version__ = "0.1.0"
