"""One module per CLI command; ``graftbuild/cli.py`` registers them."""
