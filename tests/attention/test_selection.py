"""The selection table, on CPU: GPUs, packages and torch features are pretended (monkeypatched) and `select`
must name the backend and the reason for each case; a backend asked for by name that cannot run is a one-line
AttentionUnavailable."""

import types
import typing

import pytest
import torch

from llm import config
from llm.attention import NAMES, AttentionUnavailable, describe, flash, get_attention, sdpa, select, varlen
from llm.attention.flash import Installed

BF16, FP32 = torch.bfloat16, torch.float32
PACKAGE = {p.label: p for p in flash.PACKAGES}


def fake_package(label: str, version: str) -> Installed:
    module = types.ModuleType(PACKAGE[label].module_name)
    module.flash_attn_func = module.flash_attn_varlen_func = lambda *a, **k: None
    return Installed(PACKAGE[label], module, version)


VERSIONS = {"FA2": "2.8.3", "FA3": "3.0.0", "FA4": "4.0.0"}


@pytest.fixture
def machine(monkeypatch):
    """machine(capability, *packages): pretend a GPU of that compute capability and those flash-attn packages
    (in PACKAGES order, as `installed` returns them). Returns the list of FA3/FA4 routings asked of torch."""
    routed = []

    def pretend(cap=(9, 0), *labels, route_error=None):
        found = tuple(fake_package(p.label, VERSIONS[p.label]) for p in flash.PACKAGES if p.label in labels)
        monkeypatch.setattr(flash, "installed", lambda: found)
        monkeypatch.setattr(varlen, "capability", lambda device: cap)
        monkeypatch.setattr(sdpa, "route_flash_path", lambda impl: routed.append(impl) or route_error)
        return routed

    monkeypatch.setattr(torch.version, "hip", None)
    return pretend


def chosen(requested, device="cuda", dtype=BF16, docs=False, padding=False):
    s = select(requested, device, dtype, document_masking=docs, padding=padding)
    return s.name, s.reason


# ---- auto ---------------------------------------------------------------------------------------------------------


def test_auto_on_cpu_is_sdpa_with_a_dense_mask_only_where_needed(machine):
    machine((9, 0), "FA2")  # installed packages change nothing off CUDA
    for dtype in (FP32, BF16):
        assert chosen("auto", "cpu", dtype) == ("sdpa", "sdpa no mask tensor (CPU)")
        assert chosen("auto", "cpu", dtype, docs=True) == ("sdpa", "sdpa dense block-diagonal mask (CPU)")
        assert chosen("auto", "cpu", dtype, padding=True) == ("sdpa", "sdpa key-padding mask (CPU)")


def test_auto_takes_the_flash_package_for_every_batch(machine):
    routed = machine((8, 0), "FA2")
    assert chosen("auto") == ("flash", "flash-attn 2.8.3 (FA2)")
    assert chosen("auto", docs=True) == ("flash", "flash-attn 2.8.3 (FA2) varlen over document boundaries")
    assert chosen("auto", padding=True) == ("flash", "flash-attn 2.8.3 (FA2) varlen over unpadded keys")
    assert chosen("auto", dtype=torch.float16, docs=True)[0] == "flash"
    assert routed == []


@pytest.mark.parametrize("cap, packages, expected", [
    ((9, 0), ("FA2", "FA3", "FA4"), "FA3"),  # Hopper: FA3 first
    ((9, 0), ("FA2", "FA4"), "FA4"),
    ((10, 0), ("FA2", "FA3", "FA4"), "FA4"),  # Blackwell: FA3 does not run there
    ((10, 0), ("FA2", "FA3"), "FA2"),
    ((12, 0), ("FA2", "FA3", "FA4"), "FA2"),
    ((8, 6), ("FA2", "FA4"), "FA2"),
])
def test_auto_prefers_the_newest_package_that_supports_the_gpu(machine, cap, packages, expected):
    machine(cap, *packages)
    name, reason = chosen("auto", docs=True)
    assert name == "flash" and f"({expected}) varlen over document boundaries" in reason


def test_auto_without_flash_uses_torch_varlen_for_masks_and_sdpa_flash_otherwise(machine):
    routed = machine((9, 0))
    assert chosen("auto", docs=True) == ("varlen", "torch varlen_attn over document boundaries "
                                                   "(flash-attn not installed)")
    assert chosen("auto", padding=True) == ("varlen", "torch varlen_attn over unpadded keys (flash-attn not installed)")
    assert chosen("auto") == ("sdpa", "sdpa flash/cuDNN kernel, no mask tensor (flash-attn not installed)")
    assert routed == []


def test_auto_says_when_the_installed_package_does_not_support_the_gpu(machine):
    machine((8, 0), "FA3")
    assert chosen("auto", docs=True) == (
        "varlen", "torch varlen_attn over document boundaries (installed flash-attn (FA3) does not support compute "
                  "capability 8.0)")


def test_auto_falls_back_to_a_dense_mask_only_where_varlen_cannot_run(machine, monkeypatch):
    machine((7, 5))
    assert chosen("auto", dtype=torch.float16) == ("sdpa", "sdpa no mask tensor (flash-attn not installed)")
    assert chosen("auto", dtype=torch.float16, docs=True) == (
        "sdpa", "sdpa dense block-diagonal mask (flash-attn not installed; torch varlen_attn needs compute "
                "capability 8.0 or newer, this GPU has 7.5)")
    machine((9, 0))
    monkeypatch.setattr(varlen, "torch_varlen", lambda: None)
    name, reason = chosen("auto", docs=True)
    assert name == "sdpa" and "has no torch.nn.attention.varlen" in reason


def test_auto_in_float32_on_cuda_is_sdpa(machine):
    machine((9, 0), "FA3")
    assert chosen("auto", dtype=FP32) == ("sdpa", "sdpa no mask tensor (float32: flash kernels need bf16/fp16)")
    assert chosen("auto", dtype=FP32, docs=True)[1].startswith("sdpa dense block-diagonal mask (float32")


def test_rocm_never_takes_fa3_or_fa4(machine, monkeypatch):
    machine((9, 4), "FA2", "FA3", "FA4")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert chosen("auto", docs=True)[1].startswith("flash-attn 2.8.3 (FA2)")


# ---- names --------------------------------------------------------------------------------------------------------


def test_flash_by_name(machine):
    machine((9, 0), "FA2", "FA3")
    assert chosen("flash", padding=True) == ("flash", "flash-attn 3.0.0 (FA3) varlen over unpadded keys")


def test_varlen_by_name_routes_torch_flash_kernel_to_fa3(machine):
    routed = machine((9, 0), "FA3")
    assert chosen("varlen", docs=True) == ("varlen", "torch varlen_attn over document boundaries (asked for by "
                                                     "name); torch's flash kernel is flash-attn 3.0.0 (FA3)")
    name, reason = chosen("varlen")
    assert name == "sdpa" and reason.startswith("sdpa flash/cuDNN kernel, no mask tensor (varlen asked for by name")
    assert routed == ["FA3", "FA3"]


def test_sdpa_by_name_keeps_going_when_routing_fails(machine):
    machine((10, 0), "FA4", route_error="routing SDPA's flash kernel to FA4 failed: no ops")
    assert chosen("sdpa") == ("sdpa", "sdpa flash/cuDNN kernel, no mask tensor (asked for by name); routing "
                                      "SDPA's flash kernel to FA4 failed: no ops")
    assert chosen("sdpa", docs=True) == ("sdpa", "sdpa dense block-diagonal mask (asked for by name)")
    assert chosen("eager", docs=True) == ("eager", "eager fp32 reference (asked for by name)")


@pytest.mark.parametrize("requested, device, dtype, cap, packages, message", [
    ("flash", "cpu", FP32, (9, 0), (), "no flash-attn package"),
    ("flash", "cpu", BF16, (9, 0), ("FA2",), "flash-attn runs on CUDA only, not cpu"),
    ("flash", "cuda", FP32, (9, 0), ("FA2",), "flash-attn needs bf16/fp16, not float32"),
    ("flash", "cuda", BF16, (7, 5), ("FA2", "FA3"), "(FA3, FA2) does not support compute capability 7.5"),
    ("varlen", "cpu", BF16, (9, 0), (), "torch varlen_attn runs on CUDA only, not cpu"),
    ("varlen", "cuda", FP32, (9, 0), (), "torch varlen_attn needs bf16/fp16, not float32"),
    ("varlen", "cuda", BF16, (7, 0), (), "needs compute capability 8.0 or newer, this GPU has 7.0"),
])
def test_a_backend_asked_for_by_name_that_cannot_run_is_a_one_line_error(machine, requested, device, dtype, cap,
                                                                          packages, message):
    machine(cap, *packages)
    for docs in (False, True):
        with pytest.raises(AttentionUnavailable, match=f"model.attention={requested} cannot run here") as err:
            select(requested, device, dtype, document_masking=docs)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_build_time_errors(machine, monkeypatch):
    machine((9, 0))
    with pytest.raises(ValueError, match="unknown attention backend 'fast'; choose one of auto, flash"):
        get_attention("fast")
    with pytest.raises(AttentionUnavailable, match="model.attention=flash: no flash-attn package") as err:
        get_attention("flash")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(varlen, "torch_varlen", lambda: None)
    with pytest.raises(AttentionUnavailable, match="model.attention=varlen needs torch.nn.attention.varlen"):
        get_attention("varlen")
    machine((9, 0), "FA2")
    get_attention("flash")  # builds anywhere the package is; the device is checked at the first call


def test_describe_is_select_and_names_both_kinds_of_call_with_padding(machine):
    machine((9, 0))
    assert describe("auto", "cuda", BF16, document_masking=True) == chosen("auto", docs=True)
    assert describe("auto", "cuda", BF16, document_masking=False, padding=True) == (
        "varlen+sdpa", "padded: torch varlen_attn over unpadded keys (flash-attn not installed); unpadded: sdpa "
                       "flash/cuDNN kernel, no mask tensor (flash-attn not installed)")
    assert describe("auto", "cpu", FP32, document_masking=False, padding=True)[0] == "sdpa"
    machine((9, 0), "FA2")
    assert describe("auto", torch.device("cuda", 0), BF16, document_masking=False, padding=True)[0] == "flash"


def test_config_accepts_exactly_the_backend_names():
    assert set(config.ATTENTION_BACKENDS) == set(NAMES)
    for cls in (config.ModelConfig, config.TranslationModelConfig):
        assert set(typing.get_args(typing.get_type_hints(cls)["attention"])) == set(NAMES)
