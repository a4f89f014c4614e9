"""The core every stage stands on, without torch: the parameter schema (``schema``) and its
loader (``config``), ``errors``, ``labels``, ``kinds`` of experiment, ``cohort`` (which rows
each stage uses), a run folder's paths (``layout``), its one-writer ``lock`` and stage
``records``, atomic ``files``, main-process writes (``processes``), what a notebook shows and
saves (``outputs``), the run ``summary``, ``progress`` and ``timing``.
"""
