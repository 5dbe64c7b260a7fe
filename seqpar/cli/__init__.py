"""Command-line entry points of seqpar (installed as console scripts, see pyproject.toml).

* :mod:`seqpar.cli.solve` -- ``seqpar-solve``: the sharded solve of a seeded demo problem
  (``python -m seqpar.cli.solve``, ``torchrun ... -m seqpar.cli.solve``, ``mpiexec ... python -m seqpar.cli.solve``).
* :mod:`seqpar.cli.ray_solve` -- ``seqpar-ray-solve``: the same job on Ray Train.
* :mod:`seqpar.cli.default_job` -- ``seqpar-default-job``: the README's default job.

``launch/*.py`` in the repository are thin wrappers around these modules.
"""
