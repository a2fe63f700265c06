"""The one exception type for mistakes a user can fix.

Its message is a single line naming the offending value and what to do instead; the CLI prints it
and exits with status 2 (a traceback only with ``--debug``).
"""


class NeuronAtlasError(Exception):
    """A user error: bad input, a missing file, an incompatible atlas."""
