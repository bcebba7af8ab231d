"""The paper's grid on a cluster (``script/launch.py``): which runs a grid holds and their configs
(:mod:`launcher.grid`), what a submitted job runs (:mod:`launcher.job`), SLURM and the local executor through
submitit (:mod:`launcher.clusters`), the checks before anything is submitted (:mod:`launcher.checks`), the
time and disk a grid needs (:mod:`launcher.measure`) and its status read off the disk
(:mod:`launcher.status`).

It sits above ``config/`` (each run's config is resolved by the Sacred experiment itself) and below the
entry points. Nothing is imported here, so that a job process loads :mod:`launcher.job` alone.
"""
