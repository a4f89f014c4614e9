"""The classifier grid (notebook 04): the ``grid`` as data (no torch), its ``runner`` (training
sets, arms in worker processes), ``diagnostics`` (stopping, convergence, compute, seed spread,
no torch) and ``figures``.
"""
