"""cxrlib: the library behind the notebooks of the synthetic chest X-ray study.

Stages, in the one direction data flows: ``data`` (manifests, readers, image cache, the
embedded ``phantom`` cohort) -> ``diffusion`` -> ``sampling`` -> ``classify`` -> ``stats`` and
``study_tables``. ``cohort`` selects the rows every stage works on.

Importing the package does nothing else: no module is loaded and no process-wide setting is
changed until a stage's module is imported.
"""

__version__ = "0.1.0"
