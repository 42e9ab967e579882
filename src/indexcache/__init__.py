"""indexcache: find IndexCache sharing patterns (which DSA layers keep their lightning indexer)."""

__version__ = "0.1.0"
