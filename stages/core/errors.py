"""The one base class of the errors a user must fix (bad config, data, model reference, output directory).

Entry points (`rlhf ...`, `python -m stages.X`, the recipe's stage check) catch `UserError` and print
one line, `rlhf: error: ...`, with exit code 2; any other exception is a bug and keeps its traceback.
Each layer defines its own subclasses next to the code that raises them (ConfigError in core.config,
DataError in data.formats, ...), each also deriving from the builtin type it used to be.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


class UserError(Exception):
    """Bad input the user can fix; the message says what, where (file, row, key or model) and how."""


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, UserError)


def exit_code(action: Callable[[], Any]) -> int:
    """Run `action`: a user error prints one line and gives 2, an int result is the exit code, else 0.
    Any other exception propagates with its traceback."""
    try:
        result = action()
    except Exception as error:  # noqa: BLE001 - re-raised unless it is a user error
        if not is_user_error(error):
            raise
        print(f"rlhf: error: {error}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def run_main(main: Callable[[], Any]) -> None:
    """`python -m stages.X` entry: user errors exit 2 with one clear line."""
    code = exit_code(main)
    if code:
        sys.exit(code)
