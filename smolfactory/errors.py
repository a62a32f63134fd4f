"""The one exception type users see: a single line naming the problem and the fix."""


class SmolFactoryError(ValueError):
    """A problem in the user's configuration or data that the user can fix.

    The CLI prints the message as one line and exits with status 2, without a stack trace.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type name), to quote inside our own message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
