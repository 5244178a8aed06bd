"""`python -m cnnspec ...` runs the CLI (also under `python -m mpi4py -m cnnspec`)."""

from .cli import main

main()
