"""Exceptions of seqpar."""


class NotConvergedError(RuntimeError):
    """Newton did not converge and the caller asked for ``fallback="raise"``.

    ``info`` holds the :class:`seqpar.SolveInfo` of the failed solve.
    """

    def __init__(self, message, info=None):
        super().__init__(message)
        self.info = info
