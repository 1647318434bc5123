"""The command line: the ``graftbuild`` console entry (``entry``: the no-op fast path, no heavy
imports), the click group (``app``) and one module per command. Commands parse, call the layers
below and print; the work lives in ``build/``, ``cache/``, ``skillpack/`` and ``release/``."""
