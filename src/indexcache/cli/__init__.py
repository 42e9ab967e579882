"""The `indexcache` command line (Typer), a thin layer over `indexcache.api`."""

from .app import app, main

__all__ = ["app", "main"]
