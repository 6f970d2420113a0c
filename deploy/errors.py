"""The one error type of the embedded stack: its message says what went wrong and what to do."""


class StackError(RuntimeError):
    pass
