"""The one exception type for user mistakes."""


class VitlensError(Exception):
    """A user mistake (bad name, bad path, bad value).

    The CLI prints the message on one line and exits with status 2; library users catch it like any
    other exception. Internal bugs are never wrapped in it.
    """
