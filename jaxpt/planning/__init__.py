"""Ahead-of-time memory plans: compile a run's programs for a TPU slice or CPU mesh
(no weights, no accelerator) and report what each device holds.

``topology`` names the devices (importing it does not start jax, so a CLI can still give
a ``cpu:N`` process its devices), ``memory`` compiles and measures the run that
``jaxpt.run_spec`` describes (its sharded shapes; ``abstract`` keeps the old names).
"""
