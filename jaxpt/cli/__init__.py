"""Command-line entry points, one module per command, each with ``main(argv=None) -> int``.

They parse arguments, call the library and format its output; nothing else lives here.
``python -m jaxpt.train`` (and ``jaxpt.generate``, ``jaxpt.eval``, ``jaxpt.bench``,
``jaxpt.quickstart``, ``jaxpt.convert``) and the ``jaxpt-*`` console scripts both land in
these functions.
"""
