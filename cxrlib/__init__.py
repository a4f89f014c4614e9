"""cxrlib: the library behind the numbered notebooks of the synthetic chest X-ray study.

Subpackages by role, in the one direction data flows; a module imports only from its own
layer or lower ones (tests/test_layers.py):

0. ``core`` (no torch): the parameter schema and loader, labels, kinds of experiment, which
   rows each stage uses, a run folder's paths, its one-writer lock and stage records, atomic
   files, what notebooks save, the run summary, progress and timing.
1. ``stats`` (no torch): AUROC, DeLong, the patient bootstrap, seed-level estimates, Holm.
   ``hardware``: precision and optimizer choices.
2. ``data``: site readers, the image cache, the embedded phantom cohort (notebook 01).
3. ``classifier``: timm classifiers, their training and the learnability check.
   ``diffusion``: the conditional DDPM, its samplers, training and pipeline (notebook 02).
4. ``synthetic``: synthetic cohorts, the sampling explorer and the audit (notebook 03).
5. ``experiments``: the classifier grid and its diagnostics (notebook 04).
6. ``study`` (no torch): the analysis plan, the exchange rate, the paper's claims (notebook 05).
7. ``notebook_runner`` (papermill) and the command line (``python -m cxrlib``).

Importing the package does nothing else: no module is loaded and no process-wide setting is
changed until a stage's module is imported.
"""

__version__ = "0.1.0"
