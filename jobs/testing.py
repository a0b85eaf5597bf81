"""Test doubles of the model and the encoder, for tests and benchmarks of the job machinery.

``FakeRenderer`` renders nothing (one black frame per row, in ``delay_s`` seconds) and
``fake_encode`` writes nothing (or ``size`` bytes): with them a job exercises the driver,
the workers, the results and the output without a model. They are plain module-level
objects, so Ray pickles them by reference and its workers import them from here.

In-process, pass them to ``jobs.runner.run_job`` / ``Runner`` / ``RenderWorker``
(``renderer_factory=``, ``encoder=``). For ``vcut run`` in a child process, set the
**test-only** environment variable ``VCUT_TEST_RENDERER`` to ``module:callable`` or
``module:callable(key=literal, ...)``: the callable returns the seams (a dict with
``renderer_factory`` and optionally ``encoder``), e.g.
``VCUT_TEST_RENDERER='jobs.testing:fake_seams(delay_s=0.4)'``. The driver then logs a
warning that it renders with a test double. Never set it for a real job.
"""

from __future__ import annotations

import ast
import functools
import importlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: The test-only environment variable read by ``vcut run`` (``seams_from_env``).
TEST_RENDERER_ENV = "VCUT_TEST_RENDERER"

#: The keyword arguments of ``run_job`` a seams callable may return.
SEAMS = ("renderer_factory", "encoder")


class FakeGeneration:
    """What ``Renderer.generate`` returns, for ``frames`` black ``size`` x ``size`` frames."""

    def __init__(self, seed: int, fps: int, frames: int = 1, size: int = 16) -> None:
        import numpy as np

        self.frames = np.zeros((frames, size, size, 3), dtype=np.uint8)
        self.timings = {"total": 0.0, "denoise": 0.0}
        self.cache_hit = False
        self.num_inference_steps = 1
        self.fps = fps
        self.seed = seed


class FakeRenderer:
    """The ``pipeline.Renderer`` interface the worker uses, rendering nothing in ``delay_s``
    seconds a row; its generation values are checked (``pipeline.params``) and, with
    ``load_images``, each image is read first (``pipeline.images``), so a bad value or image
    fails its row as with the model. It has no UNet config: the worker's MAC count
    fails once (a warning) and rows carry no MACs."""

    vcut_mode = "full"
    device = "cpu"
    unet_config = None

    def __init__(self, delay_s: float = 0.0, load_images: bool = False) -> None:
        self.delay_s = delay_s
        self.load_images = load_images

    def prepare_image(self, image: Any, **kwargs: Any) -> Any:
        if not self.load_images:
            return image
        from pipeline.images import load_image

        return load_image(image)

    def generate(self, image: Any, *, seed: int = 0, fps: int = 7, **kwargs: Any) -> FakeGeneration:
        from pipeline.params import GENERATION_PARAMS, check_generation

        # the renderer's own checks: a value out of range fails its row as with the model
        check_generation({k: v for k, v in kwargs.items() if k in GENERATION_PARAMS}, fps=fps)
        self.prepare_image(image)
        if self.delay_s:
            time.sleep(self.delay_s)
        return FakeGeneration(seed, fps)

    def generate_batch(
        self, images: list[Any], *, seeds: list[int], fps: int = 7, **kwargs: Any
    ) -> list[FakeGeneration]:
        pairs = zip(images, seeds, strict=True)
        return [self.generate(image, seed=seed, fps=fps, **kwargs) for image, seed in pairs]

    def generate_stream(
        self, requests: Iterable[dict[str, Any]], *, overlap: bool = True
    ) -> Iterator[list[FakeGeneration]]:
        """``Renderer.generate_stream``'s contract: each request's ``generate_batch`` videos, in
        order; a failing request raises after the videos before it. With ``overlap``, as the
        model's stream, a call's videos come back only once the next request has been taken
        and rendered (its decode overlaps that one)."""
        pending: list[FakeGeneration] | None = None
        for request in requests:
            try:
                videos = self.generate_batch(**request)
            except Exception:
                if pending is not None:  # the videos before it first
                    yield pending
                raise
            if pending is not None:
                yield pending
            pending = videos
            if not overlap:
                yield pending
                pending = None
        if pending is not None:
            yield pending


@dataclass(frozen=True)
class FakeRendererFactory:
    """A ``renderer_factory(model, cache)`` making ``FakeRenderer(delay_s, load_images)``;
    picklable with its settings (Ray workers import this class, not a test's module)."""

    delay_s: float = 0.0
    load_images: bool = False

    def __call__(self, model: Mapping[str, Any], cache: Mapping[str, Any]) -> FakeRenderer:
        return FakeRenderer(self.delay_s, self.load_images)


#: The factory of a renderer without delay.
fake_renderer = FakeRendererFactory()


def fake_encode(frames: Any, out: str, *, size: int = 0, **kwargs: Any) -> float:
    """The encoder's signature; writes nothing, or ``size`` zero bytes to ``out`` (a video's
    I/O without the work). Returns 0.0 encoding seconds."""
    if size:
        with open(out, "wb") as f:
            f.write(b"\0" * size)
    return 0.0


def fake_seams(delay_s: float = 0.0, video_bytes: int = 0, load_images: bool = False) -> dict[str, Callable]:
    """``run_job``'s seams for a job without a model: ``FakeRenderer(delay_s, load_images)`` and
    ``fake_encode`` writing ``video_bytes`` per video."""
    encoder = functools.partial(fake_encode, size=video_bytes) if video_bytes else fake_encode
    return {"renderer_factory": FakeRendererFactory(delay_s, load_images), "encoder": encoder}


def _bad_spec(spec: str, why: str) -> ValueError:
    return ValueError(
        f"{TEST_RENDERER_ENV}={spec!r}: {why} (expected module:callable or module:callable(key=literal, ...))"
    )


def seams_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, Callable]:
    """The seams named by ``VCUT_TEST_RENDERER`` (see the module docstring); {} when unset.
    Raises ``ValueError`` naming the variable for a value that is not a callable's path with
    literal keyword arguments, or whose callable returns anything but seams."""
    spec = environ.get(TEST_RENDERER_ENV, "").strip()
    if not spec:
        return {}
    module_name, colon, expr = spec.partition(":")
    if not (module_name and colon and expr.strip()):
        raise _bad_spec(spec, "no module:callable")
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError as exc:
        raise _bad_spec(spec, f"not a call: {exc.msg}") from None
    kwargs: dict[str, Any] = {}
    if isinstance(node, ast.Call):
        if node.args or any(k.arg is None for k in node.keywords):
            raise _bad_spec(spec, "only key=literal arguments are allowed")
        try:
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
        except ValueError:
            raise _bad_spec(spec, "an argument is not a literal") from None
        node = node.func
    if not isinstance(node, ast.Name):
        raise _bad_spec(spec, "the callable is not a name")
    try:
        make = getattr(importlib.import_module(module_name), node.id)
    except (ImportError, AttributeError) as exc:
        raise _bad_spec(spec, f"{type(exc).__name__}: {exc}") from None
    seams = make(**kwargs)
    if not isinstance(seams, Mapping) or not set(seams) <= set(SEAMS) or "renderer_factory" not in seams:
        raise _bad_spec(
            spec, f"the callable must return a dict with renderer_factory (and encoder), got {seams!r}"
        )
    log.warning("%s=%s: rendering with a test double, not the model", TEST_RENDERER_ENV, spec)
    return dict(seams)
