"""The pack's one exception type.

Every error a user can cause (a wrong file, a bad size, a name outside a models
folder) is raised as ``KinemaError`` with a message that names the thing and
the fix. Nodes let it propagate: ComfyUI shows the message in the UI.
"""


class KinemaError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
