"""The harness: runs, measurements, run store, leaderboard, fine-tuning.

Methods are not registered anywhere: ``method=<name>`` picks ``conf/method/<name>.yaml``, whose
``reducer._target_`` names the class (:func:`bench.job.build_reducer_from_config` builds it).
"""
