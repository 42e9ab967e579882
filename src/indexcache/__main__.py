"""`python -m indexcache …` (what `torchrun -m indexcache` runs): the same CLI as `indexcache`."""

from .cli import main

main()
