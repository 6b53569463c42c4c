"""`python -m bundlekd_edge.cli` (what `accelerate launch -m bundlekd_edge.cli train ...` runs)."""

from . import main

main()
