"""Synthetic images (notebook 03): the synthetic ``cohorts`` the classifiers train on, the
widget ``explorer``, and the ``audit`` (fidelity, diversity, memorization, texture,
detectability).
"""
