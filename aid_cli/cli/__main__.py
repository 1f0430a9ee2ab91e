"""`python -m aid_cli.cli`: the `aid` command (torchrun starts its processes this way)."""

from . import main

main()
