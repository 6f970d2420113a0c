"""`python -m stormline.cli`: the same command line as the `stormline` script."""

from stormline.cli import main

main()
