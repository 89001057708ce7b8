"""The one error type for problems a user can cause (bad file, bad recipe, bad data).

Its message says what is wrong and what to do, in one line. The CLI prints it and exits
with code 2; the app shows it in an error box. Programming errors are not wrapped.
"""


class QcoreError(ValueError):
    """A user-caused problem; ``str(err)`` is the one-line message to show."""
