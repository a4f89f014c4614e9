"""Running a stage's pieces as SLURM jobs: :mod:`~cxrlib.cluster.spec` (where and with what
resources, a file of its own: ``--cluster``), :mod:`~cxrlib.cluster.slurm` (submit through
submitit, watch, resubmit, re-attach, cancel) and :mod:`~cxrlib.cluster.cost` (what a study
will cost before it is submitted). Where jobs run is not part of a study: the same run can be
started on one machine and finished on a cluster."""
