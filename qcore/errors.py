"""The one error type for problems a user can cause (bad file, bad recipe, bad data).

Its message says what is wrong and what to do, in one line. The CLI prints it and exits
with code 2; the app shows it in an error box. Programming errors are not wrapped.
"""

import math
import reprlib


class QcoreError(ValueError):
    """A user-caused problem; ``str(err)`` is the one-line message to show."""


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 2, 4, 4


def shown(value) -> str:
    """A short, safe repr of an untrusted value for an error line (huge ints and deep lists included)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of about {round(value.bit_length() * math.log10(2)):,} digits>"
    return _repr.repr(value)
