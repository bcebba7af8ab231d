"""``python -m config <command> with ...``: the experiment's own commands (``print_run_root``)."""

from config.experiment import run_commandline

run_commandline("python -m config")
