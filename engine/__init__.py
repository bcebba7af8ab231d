"""The machinery the entry points run on (between the library packages and ``train.py``/``test.py``/
``segment.py``): the training step and its speed and scale-out switches (:mod:`engine.runtime`), snapshots
and resume (:mod:`engine.snapshots`), the training loop's monitor and stop requests (:mod:`engine.monitor`),
the evaluation protocol and its outputs (:mod:`engine.evaluation`, :mod:`engine.metrics`,
:mod:`engine.overlays`) and the picture of a run (:mod:`engine.progress`)."""
