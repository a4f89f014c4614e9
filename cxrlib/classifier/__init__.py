"""The pathology classifiers: timm models and their ``training`` (rounds, early stopping, EMA,
predictions), ``augment``, the ``learnability`` check of notebook 01, and ``figures``.
"""
