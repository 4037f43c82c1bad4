"""The one exception type for mistakes a user can make (config, mesh, data, requests)."""


class UserError(ValueError):
    """A problem the user can fix; the message names the field and the fix.

    The CLI prints it on one line and exits 2, without a traceback.
    """
