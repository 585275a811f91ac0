"""Backbone specs: the normal ways users name weights, and clear typed errors for everything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lafter.backbone import list_base_models, load_backbone, parse_spec
from lafter.errors import InvalidModelSpecError, UnsupportedArchitectureError, WeightsUnavailableError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_JSON = ASSETS / "tiny-vit.json"


def test_custom_config_with_local_checkpoint_round_trips(tmp_path):
    bb = load_backbone(f"{TINY_JSON}::random", device="cpu")
    ckpt = tmp_path / "tiny.pt"
    torch.save(bb.model.state_dict(), ckpt)
    again = load_backbone(f"{TINY_JSON}::{ckpt}", device="cpu")
    for (k, a), (_, b) in zip(bb.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert (again.width, again.embed_dim, again.image_size, again.patch_size) == (64, 32, 32, 8)
    assert again.device.type == "cpu" and again.amp_dtype is None  # CPU -> fp32 automatically
    assert not any(p.requires_grad for p in again.model.parameters())


def test_builtin_arch_with_local_checkpoint(tmp_path):
    import open_clip

    # One of open_clip's built-in architectures (its smallest ViT, to keep the test quick).
    model = open_clip.create_model("ViT-S-32")
    ckpt = tmp_path / "vits32.pt"
    torch.save(model.state_dict(), ckpt)
    bb = load_backbone(f"ViT-S-32::{ckpt}", device="cpu")
    assert torch.equal(bb.model.visual.proj, model.visual.proj)
    assert (bb.width, bb.embed_dim, bb.image_size, bb.patch_size) == (384, 384, 224, 32)


@pytest.mark.parametrize(
    "spec",
    [
        "ViT-B-32",
        "ViT-B-32::",
        "::openai",
        "NoSuchArch::openai",
        "ViT-B-32::no-such-tag",
        "/missing/cfg.json::random",
    ],
)
def test_invalid_specs_are_refused_before_loading(spec):
    with pytest.raises(InvalidModelSpecError):
        parse_spec(spec)


def test_missing_checkpoint_file_is_weights_unavailable(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_backbone(f"ViT-B-32::{tmp_path / 'nope.pt'}")


def test_non_vit_towers_are_refused():
    with pytest.raises(UnsupportedArchitectureError, match="ViT"):
        load_backbone("RN50::random")


def test_unfetchable_pretrained_tag_names_spec_and_local_file_hint(tmp_path):
    # No model hub here (and HF_HUB_OFFLINE=1): open_clip's download fails; the error must say which
    # spec and how to go local. An empty cache folder, so weights cached on a developer's machine
    # cannot make it pass.
    with pytest.raises(WeightsUnavailableError) as caught:
        load_backbone("ViT-B-32::openai", device="cpu", cache_dir=str(tmp_path))
    assert caught.value.code == "weights_unavailable"
    message = str(caught.value)
    assert "ViT-B-32::openai" in message and "ViT-B-32::/path/to/checkpoint.pt" in message, message


def test_list_base_models_includes_tags_and_local_folder(tmp_path):
    (tmp_path / "mine.json").write_text(TINY_JSON.read_text())
    bb = load_backbone(f"{TINY_JSON}::random", device="cpu")
    torch.save(bb.model.state_dict(), tmp_path / "mine.pt")
    models = list_base_models([tmp_path])
    specs = {m["spec"] for m in models}
    assert "ViT-B-32::openai" in specs
    assert not any(m["arch"].startswith("RN") for m in models)
    local = [m for m in models if m["source"] == "local"]
    assert local and local[0]["spec"] == f"{tmp_path / 'mine.json'}::{tmp_path / 'mine.pt'}"
    assert load_backbone(local[0]["spec"], device="cpu").width == 64


def test_random_weights_are_the_same_in_every_load_and_leave_the_callers_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = load_backbone(f"{TINY_JSON}::random", device="cpu")
    assert torch.equal(torch.rand(1), expected_next)
    b = load_backbone(f"{TINY_JSON}::random", device="cpu")
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
