"""The one exception for a user's configuration mistake."""


class ConfigError(ValueError):
    """A user's configuration mistake: names the flag and says how to fix it.

    Entry points print it as one line (``prog: error: --flag: message``) and exit 2, no traceback.
    """

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag
