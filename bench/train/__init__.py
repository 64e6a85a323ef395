"""Fine-tuning: the training loop, its losses and data, and the fine-tuned checkpoint that
``bench.run`` evaluates like any other weights.

:mod:`bench.finetune_job` runs a training job and then evaluates it as a ``bench.run`` job.
"""
