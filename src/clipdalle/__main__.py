"""`python -m clipdalle ...` is the `clipdalle` command (what `torchrun -m clipdalle` runs)."""

from .cli import main

main()
