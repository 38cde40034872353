"""User-facing errors and warnings: the CLI prints an error as one line, with no traceback, and
exits non-zero; a warning is one line on stderr and work goes on."""
import sys


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


def warn(message: str) -> None:
    print(f"lmpipe: warning: {message}", file=sys.stderr, flush=True)
