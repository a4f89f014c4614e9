"""Data preparation (notebook 01): site ``readers`` (CheXpert, MIMIC-CXR-JPG, any site's CSV)
into one manifest, the ``imagecache`` every model reads, the embedded ``phantom`` cohort drawn
from torchxrayvision's real ``metadata``, and the stage's ``figures``.
"""
