"""The scenec runtime: reads plans and executes them on diffusers backends."""
