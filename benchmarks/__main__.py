"""``python -m benchmarks [--quick] [--only ...]``: run the suite (see ``benchmarks/run.py``)."""

from .run import main

main()
