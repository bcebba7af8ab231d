"""``python -m config <command> with ...``: the experiment's own commands (``print_run_root``)."""

from config import ex

ex.run_commandline()
