"""The errors of efcm, by what went wrong, not where.

The core raises these; the adapters map them, each in one place: the CLI prints the message and
exits 1 (`efcm.cli`), the served model answers with the HTTP and gRPC status of
`efcm.serving.errors.STATUS` (a client error for `InvalidInput`, `Forbidden`, `TooLarge`,
`Deadline`, `Busy`; anything else is a logged 500 with no internals in the response). A batch stage
records an expected per-slide error (`InvalidInput`, `OSError`) in its status CSV and goes on; an
unexpected exception on a slide is counted apart, and fails the run when it hits most slides
(`efcm.slides.batch.SlideLoop`).

Every message names the input (a path, a URI, a slide id, a field) and what is wrong with it.
"""

from __future__ import annotations


class EfcmError(Exception):
    """Base of every error efcm raises on purpose."""


class InvalidInput(EfcmError, ValueError):
    """What a caller sent or named cannot be used (a client error: HTTP 400)."""


class InvalidTensor(InvalidInput):
    """A features or patches tensor of the wrong shape, dtype or values."""


class InvalidItem(InvalidInput):
    """One item of a batch (a slide, an image) cannot be used; `status` is its status-CSV code
    (`unreadable`, `no_mpp`, `too_large`, ...)."""

    def __init__(self, message: str, status: str = "unreadable") -> None:
        super().__init__(message)
        self.status = status


class InvalidSlide(InvalidItem):
    """A slide cannot be used; `status` is its status-CSV code (`unreadable`, `no_mpp`, ...)."""


class InvalidImage(InvalidItem):
    """An image file cannot be used (not an image, empty, a DICOM without pixel data, an absurd
    size, no field of view to crop); `status` is its status-CSV code."""


class Forbidden(EfcmError):
    """A slide URI the server may not open (HTTP 403)."""


class TooLarge(EfcmError):
    """An input over a limit: patches per bag, bytes of a slide or a request (HTTP 413)."""


class Deadline(EfcmError, TimeoutError):
    """Work that ran past its time budget; it stopped at the next batch (HTTP 504)."""


class Busy(EfcmError):
    """Every worker of a bounded pool is at work (HTTP 503)."""


class PackageError(EfcmError):
    """A model package is missing, incomplete or corrupt: the server's fault, never the client's
    (HTTP 500 when found while serving; `efcm serve` refuses to start on it)."""


class BatchFailed(EfcmError, RuntimeError):
    """A batch stage failed as a whole: every slide failed (or `fail_on` says so), or an
    unexpected error hit most slides."""


class TrainingJobFailed(EfcmError, RuntimeError):
    """A training job on the cluster (a Kubeflow Trainer TrainJob) ended Failed; the message names
    the job and its condition's reason and message."""
