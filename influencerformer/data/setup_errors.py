"""The errors of data setup (download, verification, extraction, preparation): each names the file and what was
expected. (Bad contents of a data file read for training are ``errors.DataError``.)"""

from __future__ import annotations


class DataSetupError(RuntimeError):
    """A download or preparation step failed; the message names the file and what was expected."""


class DownloadError(DataSetupError):
    """The transfer failed (server unreachable, HTTP error, connection dropped too often)."""


class VerificationError(DataSetupError):
    """A file's size, checksum or contents are not what was expected."""
