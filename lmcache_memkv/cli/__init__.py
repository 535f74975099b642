"""The ``memkv`` command line (typer)."""
