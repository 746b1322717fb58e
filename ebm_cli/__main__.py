"""``python -m ebm_cli ARGS``: the ``ebm`` command without the console script."""
from .main import console_main

console_main()
