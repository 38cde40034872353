"""User-facing errors: the CLI prints them as one line each, with no traceback, and exits non-zero."""


class UserError(Exception):
    """Bad input from the user: the message names the input, what is wrong and what to do."""

    exit_code = 2
    prefix = "error: "  # how the CLI introduces the message


class ConfigError(UserError):
    """One or more invalid settings; every problem is collected before raising."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def joined(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c': lists inside error messages."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
