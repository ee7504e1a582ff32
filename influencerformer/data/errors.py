"""The one error type of bad input data: a file (and the line, annotation or point in it) and what is wrong."""
from __future__ import annotations


class DataError(ValueError):
    """A data file cannot be used; the message names the file. The CLI prints it as one line, exit status 2."""
