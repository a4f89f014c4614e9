"""The statistics of the study (notebook 05), without torch: the analysis ``plan``
(primary comparison, manipulation checks, dose-response), ``secondary`` analyses (labels,
subgroups, calibration), the ``exchange`` rate, the paper's ``claims``, ``findings`` in
sentences, and ``figures``.
"""
