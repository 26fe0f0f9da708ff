"""Batch builds: ``scenec build`` and ``scenec status`` (docs/batch.md).

dbt's model, for images. One module per concept, in the order a build runs them:

- :mod:`~scenec.build.options`: what a build is asked to do (``BuildOptions``), and ``BatchError``;
- :mod:`~scenec.build.discovery`: ``DIR | GLOB | FILE`` arguments → scene files;
- :mod:`~scenec.build.selection`: ``--select`` / ``--exclude``;
- :mod:`~scenec.build.keys`: model identity and each output's cache key;
- :mod:`~scenec.build.manifest`: ``OUTDIR/scenec-manifest.json``, the lock, stale temp files;
- :mod:`~scenec.build.memo` and :mod:`~scenec.build.planning`: scenes → jobs with keys and states,
  compiling only what changed;
- :mod:`~scenec.build.units`: units of work, batches of them, and the sub-plan each one ships;
- :mod:`~scenec.build.pool`, :mod:`~scenec.build.executors`, :mod:`~scenec.build.ray_executor`: where
  units run (this process or Ray actors), each process loading a model once;
- :mod:`~scenec.build.reporting`: status, summaries, what is printed;
- :mod:`~scenec.build.driver`: ``build_batch``, the whole build.

Nothing imports torch before something is to be built: ``scenec status`` and ``scenec build
--dry-run`` run in any CI.
"""
