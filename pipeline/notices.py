"""Library log lines that are not the user's to act on, dropped where they are logged.

Each entry is one message of one library logger, matched by its exact start: the same
loggers' other lines (real warnings included) still reach the terminal and the logs. Torch-
and Ray-free (it names loggers, it imports nothing), so any layer may call :func:`quiet_notices`
before the library speaks: model loading (``pipeline.loading``), ``vcut tiny-model``, and
``jobs.preflight.connect_ray`` before ``ray.init``.
"""

from __future__ import annotations

import logging

#: logger -> (start of the message dropped, why it is not the user's to act on)
NOTICES: dict[str, tuple[str, str]] = {
    "transformers.utils.import_utils": (
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`",
        "SVD's feature extractor (resize + normalize of the conditioning image) runs on the PIL "
        "backend, transformers' behaviour before its torchvision backend; torchvision is not a "
        "dependency and installing it changes nothing the job needs",
    ),
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster.",
        "Ray logs it when `vcut run` without --address starts its own local Ray instance "
        "(token auth is Ray's default there, with a token in ~/.ray/auth_token); that instance "
        "lives and dies with the job, so there is nothing to opt out of",
    ),
}


class _DropNotice(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_notices() -> None:
    """Install the filters of :data:`NOTICES` on their loggers (idempotent, process-wide)."""
    for name, (start, _why) in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(start))
