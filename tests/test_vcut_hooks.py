"""VCUT's hooks can be found and removed, and misuse says what to do (issue #11)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import vcut
from vcut.tiny import make_tiny_pipeline


@pytest.fixture(scope="module")
def stock_unet() -> torch.nn.Module:
    return make_tiny_pipeline(seed=1).unet


def _inputs(unet: torch.nn.Module, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 3, 8, 8, 8, generator=g),
        timestep=10.0,
        encoder_hidden_states=torch.randn(2, 1, unet.config.cross_attention_dim, generator=g),
        added_time_ids=torch.tensor([[6.0, 127.0, 0.02]] * 2),
    )


def _out(unet: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return unet(**_inputs(unet, seed)).sample


def _hook_count(unet: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())


def _fingerprint(unet: torch.nn.Module) -> tuple:
    """Module tree, parameters (by identity) and processors: what a patch may change."""
    return (
        [(n, type(m).__name__) for n, m in unet.named_modules()],
        [(n, id(p)) for n, p in unet.named_parameters()],
        {n: type(p) for n, p in unet.attn_processors.items()},
        [
            n
            for n, m in unet.named_modules()
            if "forward" in vars(m) or any(k.startswith("_vcut") for k in vars(m))
        ],
    )


@pytest.mark.parametrize("mode", ["exact", "full"])
def test_remove_vcut_gives_stock_back_bit_for_bit(stock_unet, mode):
    unet = vcut.shared_weight_copy(stock_unet)
    before, expected = _fingerprint(unet), _out(stock_unet)
    vcut.apply_vcut(unet, mode)
    state = vcut.vcut_state(unet)
    assert state is not None and len(state.handles) == 2 and _hook_count(unet) == 2
    assert not torch.equal(_out(unet), expected) or mode == "exact"  # "exact" may round alike
    vcut.remove_vcut(unet)
    assert _hook_count(unet) == 0 and vcut.vcut_state(unet) is None and vcut.vcut_mode(unet) == "off"
    assert _fingerprint(unet) == before
    assert list(unet.state_dict()) == list(stock_unet.state_dict())
    assert torch.equal(_out(unet), expected)
    vcut.remove_vcut(unet)  # a no-op now
    vcut.apply_vcut(unet, "full" if mode == "exact" else "exact")  # any mode may follow a removal
    assert vcut.vcut_mode(unet) != mode and _hook_count(unet) == 2


def test_applying_twice_stacks_nothing_and_switching_asks_for_remove(stock_unet):
    unet = vcut.shared_weight_copy(stock_unet)
    report = vcut.apply_vcut(unet, "exact")
    assert vcut.apply_vcut(unet, "exact") == report and _hook_count(unet) == 2
    with pytest.raises(vcut.VCUTError, match="remove_vcut"):
        vcut.apply_vcut(unet, "full")
    vcut.apply_step_cache(unet, 2)
    vcut.apply_step_cache(unet, 2)
    assert _hook_count(unet) == 4
    vcut.remove_step_cache(unet)
    assert _hook_count(unet) == 2 and vcut.step_cache_state(unet) is None
    vcut.remove_vcut(unet)
    assert _hook_count(unet) == 0


def test_step_cache_removal_gives_stock_back(stock_unet):
    unet = vcut.shared_weight_copy(stock_unet)
    before = _fingerprint(unet)
    vcut.apply_step_cache(unet, 3, depth=2)
    _out(unet)
    vcut.remove_step_cache(unet)
    assert _hook_count(unet) == 0 and _fingerprint(unet) == before
    assert torch.equal(_out(unet), _out(stock_unet))


def test_a_copy_of_a_patched_unet_is_removed_on_its_own(stock_unet):
    patched = vcut.shared_weight_copy(stock_unet)
    vcut.apply_vcut(patched, "full")
    vcut.apply_step_cache(patched, 2)
    twin = vcut.shared_weight_copy(patched)  # shares the kept weights too
    assert {id(p) for p in vcut.vcut_state(twin).removed_parameters()} == {
        id(p) for p in vcut.vcut_state(patched).removed_parameters()
    }
    vcut.remove_step_cache(twin)
    vcut.remove_vcut(twin)
    assert _hook_count(twin) == 0 and _hook_count(patched) == 4
    assert torch.equal(_out(twin), _out(stock_unet))
    assert vcut.vcut_mode(patched) == "full"


def test_keep_removed_false_frees_the_weights_and_cannot_be_undone(stock_unet):
    unet = vcut.shared_weight_copy(stock_unet)
    vcut.apply_vcut(unet, "full", keep_removed=False)
    assert vcut.vcut_state(unet).removed_parameters() == []
    with pytest.raises(vcut.VCUTError, match="load the model again"):
        vcut.remove_vcut(unet)
    with pytest.raises(vcut.VCUTError, match="load the model again"):
        vcut.apply_vcut(unet, "exact")


def test_resetting_the_attention_processors_raises_vcut_error(stock_unet):
    unet = vcut.shared_weight_copy(stock_unet)
    vcut.apply_vcut(unet, "exact")
    expected = _out(unet)
    with pytest.raises(ValueError):  # diffusers itself refuses: VCUT's processors are not its own
        unet.set_default_attn_processor()
    unet.set_attn_processor(AttnProcessor())  # was: TypeError: 'NoneType' object is not callable
    with pytest.raises(
        vcut.VCUTError, match=r"replaced after apply_vcut.*apply_vcut\(unet, 'exact'\).*remove_vcut"
    ):
        _out(unet)
    vcut.apply_vcut(unet, "exact")  # puts VCUT's processors back, no second hook
    # (the other attentions keep the AttnProcessor just set: same values up to rounding)
    assert _hook_count(unet) == 2 and torch.allclose(_out(unet), expected, atol=1e-5)
    unet.set_attn_processor(AttnProcessor())
    vcut.remove_vcut(unet)  # restores the original processors whatever was set since
    unet.set_default_attn_processor()  # now a stock UNet: allowed
    assert torch.allclose(_out(unet), _out(stock_unet), atol=1e-5)


@pytest.mark.slow  # a subprocess
def test_modes_import_without_torch():
    code = (
        "import sys, vcut.modes, vcut; from vcut import MODES; "
        "assert MODES == vcut.modes.MODES == ('off', 'exact', 'full'); "
        "from jobs.config import VcutMode; assert [m.value for m in VcutMode] == list(MODES); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "from vcut import apply_vcut; assert 'torch' in sys.modules and callable(apply_vcut)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_resolve_unet_finds_the_unet_and_names_its_user(stock_unet):
    from types import SimpleNamespace

    from vcut.unet import resolve_unet

    compiled = torch.compile(stock_unet)  # wrapped, not compiled until called
    for obj in (stock_unet, SimpleNamespace(unet=stock_unet), compiled, SimpleNamespace(unet=compiled)):
        assert resolve_unet(obj, "x") is stock_unet
    with pytest.raises(TypeError, match=r"^step caching expects a diffusers .* got Linear$"):
        resolve_unet(torch.nn.Linear(2, 2), "step caching")
    with pytest.raises(TypeError, match="^apply_vcut expects"):
        vcut.apply_vcut(SimpleNamespace(unet=None), "exact")


def test_count_parameters():
    from vcut.unet import count_parameters

    linear, conv = torch.nn.Linear(3, 4), torch.nn.Conv2d(2, 5, 3, bias=False)
    assert count_parameters(linear) == 3 * 4 + 4 and count_parameters(conv) == 2 * 5 * 3 * 3
    assert count_parameters(linear, None, conv) == 16 + 90 and count_parameters() == 0
