"""The harness: runs, measurements, run store, leaderboard, fine-tuning.

A job's way through the package, top to bottom:

- the commands and jobs at this level: ``run`` (the Hydra entry) -> ``job`` (validate, build the
  reducer, solve the ``budget``, run each measurement) -> ``store`` (one record per job) ->
  ``leaderboard`` (rebuilt by ``callbacks`` at the end of a sweep); ``finetune`` -> ``finetune_job``;
  ``compare``, ``publish``, ``train_throughput``;
- ``measure/``: one module per measurement, in the order ``job.MEASUREMENTS`` runs them, and
  the cache of the unreduced model's numbers;
- ``report/``: the leaderboard's sections, statistics and figures;
- ``train/``: the fine-tuning loop, its losses and data, the fine-tuned checkpoint;
- shared basics at this level: ``config`` (the typed schema of a job's config), ``data``,
  ``models``, ``store``, ``results_io``, ``errors``, ``finite``, ``terminal``, ``sweep_id``.

Methods are not registered anywhere: ``method=<name>`` picks ``conf/method/<name>.yaml``, whose
``reducer._target_`` names the class (:func:`bench.job.build_reducer_from_config` builds it).
"""
