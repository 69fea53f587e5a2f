"""Every loss of the method against values computed by hand on small tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from scripts.engines import METHOD_PRESETS, resolve_method
from scripts.errors import ConfigError
from scripts.losses import cutmix_targets, masked_cross_entropy, prototype_infonce, sample_pixels_per_class, supervised_loss
from scripts.prototypes import PrototypeBank


def test_masked_ce_divides_by_all_valid_pixels():
    logits = torch.zeros(1, 2, 1, 3)  # every pixel: CE = log 2
    target = torch.tensor([[[1, 0, 1]]])
    confidence = torch.tensor([[[0.99, 0.5, 0.99]]])
    valid = torch.tensor([[[True, True, False]]])
    # one confident valid pixel, two valid pixels: log(2) / 2
    assert masked_cross_entropy(logits, target, confidence, valid, 0.95).item() == pytest.approx(math.log(2) / 2)


def test_masked_ce_uses_the_target_class():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # 1 x 2 x 1 x 1
    ones = torch.ones(1, 1, 1)
    loss = masked_cross_entropy(logits, torch.tensor([[[1]]]), ones, ones.bool(), 0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(2.0))))


def test_supervised_loss_by_hand_with_padding_ignored():
    logits = torch.zeros(1, 2, 1, 3)
    target = torch.tensor([[[1, 1, 0]]])
    valid = torch.tensor([[[True, True, False]]])
    # CE over the two valid pixels: log 2. Dice with probabilities 0.5 on the two valid pixels:
    # class 0: 1 - (0 + s) / (1 + 0 + s) ~ 1; class 1: 1 - (2 * 1) / (1 + 2) = 1/3; mean 2/3.
    expected = 0.5 * math.log(2) + 0.5 * (2 / 3)
    assert supervised_loss(logits, target, valid).item() == pytest.approx(expected, abs=1e-4)


def test_cutmix_replaces_targets_inside_the_box_only():
    box = torch.tensor([[[True, False], [False, True]]])
    target, conf, valid = torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 0.2), torch.ones(1, 2, 2, dtype=torch.bool)
    mix_t, mix_c, mix_v = torch.ones(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 0.9), torch.zeros(1, 2, 2, dtype=torch.bool)
    t, c, v = cutmix_targets(box, target, conf, valid, mix_t, mix_c, mix_v)
    assert t.tolist() == [[[1, 0], [0, 1]]]
    torch.testing.assert_close(c, torch.tensor([[[0.9, 0.2], [0.2, 0.9]]]))
    assert v.tolist() == [[[False, True], [True, False]]]


def test_infonce_with_known_prototypes():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    prototypes = torch.eye(2)
    target = torch.tensor([0, 1])
    # temperature 0.5: logits [[2, 0], [0, 2]], so each pixel's loss is log(1 + e^-2)
    assert prototype_infonce(z, target, prototypes, 0.5).item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-5)
    wrong = prototype_infonce(z, torch.tensor([1, 0]), prototypes, 0.5)
    assert wrong.item() == pytest.approx(math.log1p(math.exp(2)), rel=1e-5)


def test_infonce_empty_selection_is_zero_with_graph():
    prototypes = torch.eye(2, requires_grad=True)
    loss = prototype_infonce(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), prototypes, 0.1)
    assert loss.item() == 0.0
    loss.backward()


def test_pixel_sampling_bounds_each_class():
    target = torch.tensor([0] * 50 + [1] * 5 + [2] * 20)
    keep = torch.ones_like(target, dtype=torch.bool)
    keep[-10:] = False
    idx = sample_pixels_per_class(target, keep, 3, max_per_class=8, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(target[idx], minlength=3).tolist()
    assert counts == [8, 5, 8]
    assert keep[idx].all() and len(set(idx.tolist())) == len(idx)


def test_bank_masked_average_and_ema_update():
    bank = PrototypeBank(num_classes=2, dim=2, momentum=0.99)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 4.0]])
    target = torch.tensor([0, 0, 1, 1])
    keep = torch.tensor([True, True, True, False])
    means, present = bank.batch_prototypes(emb, target, keep)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(means, torch.tensor([[s, s], [s, s]]))
    assert present.tolist() == [True, True]
    bank.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([True, True]))  # first update: set directly
    assert bank.ready
    bank.update(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([True, False]))  # class 1 absent: unchanged
    expected = F.normalize(torch.tensor([0.99, 0.01]), dim=0)
    assert bank.prototypes[0].tolist() == pytest.approx(expected.tolist())
    assert bank.prototypes[1].tolist() == [0.0, 1.0]
    assert bank.updates.tolist() == [2, 1]
    assert "prototypes" in bank.state_dict() and not any(p.requires_grad for p in bank.parameters())


def test_presets():
    assert set(METHOD_PRESETS) == {"supervised", "fixmatch", "unimatch", "mpamatch_img", "mpamatch_txt", "mpamatch"}
    full = resolve_method("mpamatch")
    assert (full.weight_s1, full.weight_s2, full.weight_fp, full.lambda_img, full.lambda_txt) == (0.25, 0.25, 0.5, 0.1, 0.1)
    assert resolve_method("fixmatch").strong_views == 1 and not resolve_method("supervised").unsupervised
    assert resolve_method("mpamatch_img").lambda_txt == 0 and resolve_method("mpamatch_txt").lambda_img == 0
    assert resolve_method("mpamatch", lambda_txt=0.5).lambda_txt == 0.5
    with pytest.raises(ConfigError, match="Unknown method 'meanteacher'"):
        resolve_method("meanteacher")


def test_contrast_pixels_stay_aligned_with_their_targets():
    from scripts.engines import gather_contrast_pixels

    torch.manual_seed(0)
    targets = [torch.randint(0, 3, (2, 4, 5)), torch.randint(0, 3, (3, 4, 5))]
    keeps = [torch.ones(2, 4, 5, dtype=torch.bool), torch.rand(3, 4, 5) > 0.3]
    # each pixel's embedding carries its own target and the index of its map, so any misalignment shows
    embeddings = [torch.stack([t.float(), torch.full_like(t, b, dtype=torch.float32)], dim=1) for b, t in enumerate(targets)]
    pixels, target, block = gather_contrast_pixels(embeddings, targets, keeps, num_classes=3, max_per_class=7)
    assert torch.equal(pixels[:, 0].long(), target)
    assert torch.equal(pixels[:, 1].long(), block)
    assert torch.bincount(target, minlength=3).tolist() == [7, 7, 7]
    assert set(block.tolist()) == {0, 1}
