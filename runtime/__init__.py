"""The scenec runtime: executes plans (scenec.spec.plan) on model families (runtime/families/) with one
sampler (runtime/sampler.py) and the methods as modules (runtime/methods/); see docs/architecture.md.

Importing this package imports no torch: the modules that need it import it themselves."""
