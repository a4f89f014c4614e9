"""The audit of a generator (notebook 03): image ``metrics`` (FID/KID, PRDC, MS-SSIM,
nearest neighbours, memorization), ``encoders``, conditional ``fidelity`` by a judge
classifier, ``texture``, ``detectability``, the audit ``run`` over a run's cohorts, and its
``figures``.
"""
