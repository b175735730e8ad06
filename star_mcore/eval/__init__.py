"""Accuracy evaluation: RULER's 13 tasks and BABILong qa1-qa5, generated offline and seeded, run through the
inference engine, scored as RULER scores them.

The generators (``text``, ``ruler``, ``babilong``, ``scoring``, ``tasks``) are plain Python: they import
nothing of torch or Megatron-core, so the probe-model training script uses them too. ``loop`` (the
``star-mcore eval`` run) and ``report`` sit above ``inference``.
"""
