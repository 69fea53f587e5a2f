"""UNI-TransUNet: shapes over a grid of encoders, sizes and skips, the eval contract, options and errors."""

import itertools

import pytest
import torch

from scripts.errors import ConfigError
from scripts.networks import ENCODER_PRESETS, UNITransUNet, build_encoder
from tests.helpers import TINY_DECODER, TINY_ENCODER

# (encoder preset, patch size) x (grid height, grid width) x n_skip
ENCODERS = [("vit_tiny", 16), ("vit_tiny_reg_p14", 14)]
GRIDS = [(4, 4), (3, 5), (5, 2)]
SHAPE_CASES = list(itertools.product(ENCODERS, GRIDS, range(4)))


def tiny_net(encoder="vit_tiny", **kwargs):
    return UNITransUNet(encoder_name=encoder, encoder_kwargs=TINY_ENCODER, **{"out_channels": 2, **TINY_DECODER, **kwargs})


@pytest.mark.parametrize("encoder,grid,n_skip", [(e, g, n) for (e, g, n) in SHAPE_CASES])
def test_shapes(encoder, grid, n_skip):
    name, patch = encoder
    net = tiny_net(name, n_skip=n_skip)
    assert net.patch_size == patch
    h, w = grid[0] * patch, grid[1] * patch
    x = torch.rand(2, 3, h, w)
    net.eval()
    with torch.no_grad():
        logits = net(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 2, h, w)
    net.train()
    out = net(x, need_fp=True, need_embed=True)
    assert out.logits.shape == (2, 2, h, w)
    assert out.logits_fp.shape == (2, 2, h, w)
    assert out.embeddings.shape == (2, TINY_DECODER["embed_dim"], (h + 1) // 2, (w + 1) // 2)


def test_eval_contract_single_tensor_and_deterministic():
    net = tiny_net().eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert type(a) is torch.Tensor
    torch.testing.assert_close(a, b)


def test_train_mode_plain_call_returns_logits():
    net = tiny_net().train()
    assert isinstance(net(torch.rand(2, 3, 32, 32)), torch.Tensor)


def test_embeddings_are_unit_length():
    net = tiny_net().train()
    emb = net(torch.rand(2, 3, 64, 64), need_embed=True).embeddings
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, 32, 32))


def test_feature_perturbation_changes_logits_in_train_mode():
    torch.manual_seed(0)
    net = tiny_net().train()
    out = net(torch.rand(2, 3, 64, 64), need_fp=True)
    assert not torch.allclose(out.logits, out.logits_fp)
    assert out.embeddings is None


def test_fp_clean_half_matches_plain_forward():
    # The clean half of the FP batch must be the ordinary prediction (BatchNorm in eval for a fair comparison).
    torch.manual_seed(0)
    net = tiny_net().eval()
    net.fp_dropout.train()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x, need_fp=True)
        plain = net(x)
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)


def test_n_skip_zero_builds_no_cnn_branch():
    assert tiny_net(n_skip=0).skip_stem is None
    assert tiny_net(n_skip=2).skip_stem is not None


def test_freeze_encoder_and_blocks():
    net = tiny_net(freeze_encoder=True)
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert all(p.requires_grad for p in net.decoder.parameters())
    net = tiny_net(freeze_blocks=1)
    assert not any(p.requires_grad for p in net.encoder.blocks[0].parameters())
    assert all(p.requires_grad for p in net.encoder.blocks[1].parameters())
    assert not net.encoder.pos_embed.requires_grad
    # Frozen parameters receive no gradient; the trainable ones do.
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert net.encoder.blocks[0].attn.qkv.weight.grad is None
    assert net.encoder.blocks[1].attn.qkv.weight.grad is not None


def test_parameter_groups_scale_encoder_lr():
    net = tiny_net(freeze_blocks=1)
    groups = {g["name"]: g for g in net.parameter_groups(0.01, 0.1)}
    assert groups["decoder"]["lr"] == pytest.approx(0.01)
    assert groups["encoder"]["lr"] == pytest.approx(0.001)
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(1 for p in net.parameters() if p.requires_grad)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = tiny_net().train()
    ckpt = tiny_net(grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.encoder.grad_checkpointing
    x = torch.rand(2, 3, 32, 32)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    torch.testing.assert_close(plain.encoder.blocks[0].attn.qkv.weight.grad, ckpt.encoder.blocks[0].attn.qkv.weight.grad)


def test_uni_presets_build_the_published_layouts():
    uni = build_encoder("uni", depth=1)
    assert (uni.embed_dim, uni.patch_embed.patch_size, uni.num_prefix_tokens) == (1024, (16, 16), 1)
    uni2 = build_encoder("uni2-h", depth=1)
    assert (uni2.embed_dim, uni2.patch_embed.patch_size, uni2.num_prefix_tokens) == (1536, (14, 14), 9)
    assert set(ENCODER_PRESETS) >= {"uni", "uni2-h", "vit_small", "vit_tiny"}


def test_any_timm_vit_name_works():
    net = UNITransUNet(encoder_name="vit_base_patch16_224", encoder_kwargs={"depth": 1}, **TINY_DECODER).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 32, 48)).shape == (1, 2, 32, 48)


def test_unknown_encoder_name():
    with pytest.raises(ConfigError, match="Unknown encoder name 'uni3'.*encoder_name"):
        tiny_net("uni3")


def test_non_vit_timm_model_refused():
    with pytest.raises(ConfigError, match="Unknown encoder name 'resnet18'"):
        tiny_net("resnet18")


@pytest.mark.parametrize("size", [(40, 32), (32, 20)])
def test_input_not_multiple_of_patch(size):
    net = tiny_net().eval()
    with pytest.raises(ConfigError, match=f"{size[0]}x{size[1]} is not a multiple of the encoder patch size 16"):
        net(torch.rand(1, 3, *size))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_skip": 4}, "n_skip=4"),
        ({"out_channels": 1}, "out_channels=1"),
        ({"embed_level": 4}, "embed_level=4"),
        ({"freeze_blocks": 3}, "freeze_blocks=3"),
        ({"fp_dropout": 1.0}, "fp_dropout=1.0"),
        ({"decoder_channels": (16, 8)}, "decoder_channels"),
    ],
)
def test_ill_arg(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_net(**kwargs)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_hybrid_layout_feeds_the_vit_with_the_cnn_stem(grid):
    net = tiny_net(hybrid=True, n_skip=3)
    assert net.patch_size == 16 and net.encoder.patch_embed.patch_size == (2, 2)
    assert net.encoder.patch_embed.proj.in_channels == TINY_DECODER["skip_channels"][0]
    h, w = grid[0] * 16, grid[1] * 16
    x = torch.rand(2, 3, h, w)
    tokens, skips = net.encode(x)
    assert tokens.shape[-2:] == grid and skips[0].shape[-2:] == (h // 8, w // 8)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 2, h, w)
    # the ViT really reads the stem: a change of the stem's weights changes the tokens
    with torch.no_grad():
        net.skip_stem.stages[0][0][0].weight.mul_(2.0)
        assert not torch.allclose(net.encode(x)[0], tokens)


def test_hybrid_layout_keeps_the_stem_without_skips_and_refuses_what_cannot_work(tmp_path):
    net = tiny_net(hybrid=True, n_skip=0)
    assert net.skip_stem is not None and net.decoder.blocks[0].conv1[0].in_channels == 32  # no skip concatenated
    with pytest.raises(ConfigError, match="divisible by 8"):
        tiny_net("vit_tiny_reg_p14", hybrid=True)
    weights = tmp_path / "encoder.pth"
    torch.save(build_encoder("vit_tiny", **TINY_ENCODER).state_dict(), weights)
    with pytest.raises(ConfigError, match="hybrid=true feeds the ViT with CNN features"):
        tiny_net(hybrid=True, encoder_weights=str(weights))
    assert tiny_net(hybrid="false").hybrid is False  # the command line passes yes / no keys as strings


def test_projection_head_projects_picked_pixels_as_the_whole_map():
    """``project`` on a few hidden-map rows gives the whole-map embeddings at those pixels, and the same gradient."""
    from scripts.networks import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(6, 16).train()
    hidden = head.features(torch.randn(2, 6, 5, 7)).detach()
    picked = torch.tensor([0, 9, 34, 50, 69])
    whole = head.embed(hidden).permute(0, 2, 3, 1).reshape(-1, 16)[picked]
    (whole * torch.arange(16.0)).sum().backward()
    whole_grad = head.layers[3].weight.grad.clone()
    head.zero_grad()
    sparse = head.project(hidden.permute(0, 2, 3, 1).reshape(-1, 6)[picked])
    (sparse * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(sparse, whole)
    torch.testing.assert_close(head.layers[3].weight.grad, whole_grad)
    torch.testing.assert_close(sparse.norm(dim=1), torch.ones(5))
