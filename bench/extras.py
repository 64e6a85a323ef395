"""Optional measurements that plug into every job (enabled in the ``bench`` config group)."""
