"""``jobs.testing``: the fake renderer and the test-only ``VCUT_TEST_RENDERER`` seam of ``vcut run``."""

from __future__ import annotations

import functools
import logging

import pytest

from jobs.testing import (
    TEST_RENDERER_ENV,
    FakeRenderer,
    FakeRendererFactory,
    fake_encode,
    fake_seams,
    seams_from_env,
)


def test_unset_is_no_seam():
    assert seams_from_env({}) == {} and seams_from_env({TEST_RENDERER_ENV: " "}) == {}


def test_a_callable_with_literal_arguments(caplog):
    with caplog.at_level(logging.WARNING, logger="jobs.testing"):
        seams = seams_from_env({TEST_RENDERER_ENV: "jobs.testing:fake_seams(delay_s=0.25, video_bytes=3)"})
    assert seams["renderer_factory"] == FakeRendererFactory(0.25)
    assert isinstance(seams["encoder"], functools.partial) and seams["encoder"].keywords == {"size": 3}
    assert "rendering with a test double" in caplog.text  # a real job that has it set says so
    assert seams_from_env({TEST_RENDERER_ENV: "jobs.testing:fake_seams"})["encoder"] is fake_encode


@pytest.mark.parametrize(
    "spec, why",
    [
        ("jobs.testing", "no module:callable"),
        ("jobs.testing:fake_seams(0.1)", "only key=literal arguments"),
        ("jobs.testing:fake_seams(delay_s=abs(1))", "not a literal"),
        ("jobs.testing:fake_seams(", "not a call"),
        ("jobs.testing:nothing_here", "AttributeError"),
        ("jobs.no_such_module:f", "ModuleNotFoundError"),
        ("jobs.testing:FakeRenderer", "must return a dict with renderer_factory"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_variable(spec, why):
    with pytest.raises(ValueError, match=rf"^{TEST_RENDERER_ENV}=") as info:
        seams_from_env({TEST_RENDERER_ENV: spec})
    assert why in str(info.value) and "\n" not in str(info.value)


def test_fake_renderer_and_encoder(tmp_path):
    renderer = FakeRendererFactory()({"id": "x"}, {})
    assert isinstance(renderer, FakeRenderer) and renderer.unet_config is None
    gen = renderer.generate("img.png", seed=5, fps=9)
    assert gen.frames.shape == (1, 16, 16, 3) and (gen.seed, gen.fps) == (5, 9)
    batch = renderer.generate_batch(["a", "b"], seeds=[1, 2], fps=6)
    assert [(g.seed, g.fps) for g in batch] == [(1, 6), (2, 6)]
    assert fake_encode(gen.frames, str(tmp_path / "none.mp4")) == 0.0 and not (tmp_path / "none.mp4").exists()
    encode = fake_seams(video_bytes=7)["encoder"]
    encode(gen.frames, str(tmp_path / "v.mp4"), fps=9)
    assert (tmp_path / "v.mp4").read_bytes() == b"\0" * 7
