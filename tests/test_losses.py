import torch
import torch.nn.functional as F

from ppcr.model.losses import mask_losses


def test_mask_losses_count_each_image_over_its_own_region_only():
    torch.manual_seed(0)
    low = torch.randn(3, 8, 8)  # SAM's low-resolution logits for a 32 x 32 frame
    sizes = torch.tensor([[32, 20], [12, 32], [32, 32]])  # h, w of each image inside the frame
    targets = torch.zeros(3, 32, 32, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes.tolist()):
        targets[i, : h // 2, : w // 2] = 1
    bce, dice = mask_losses(low, targets, sizes)
    ref_bce, ref_dice = [], []
    for i, (h, w) in enumerate(sizes.tolist()):  # upsample, crop the padding away, then per-pixel losses
        x = F.interpolate(low[i][None, None], (32, 32), mode="bilinear", align_corners=False)[0, 0, :h, :w].flatten()
        t = targets[i, :h, :w].float().flatten()
        ref_bce.append(F.binary_cross_entropy_with_logits(x, t))
        p = x.sigmoid()
        ref_dice.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    assert torch.allclose(bce, torch.stack(ref_bce).mean(), atol=1e-6)
    assert torch.allclose(dice, torch.stack(ref_dice).mean(), atol=1e-6)
    # Logits in the padding do not count: changing them changes nothing.
    padded = low.clone()
    padded[0, :, 6:] = 50.0  # columns >= 24 of image 0, whose width is 20
    assert torch.allclose(torch.stack(mask_losses(padded, targets, sizes)), torch.stack([bce, dice]), atol=1e-6)


def test_mask_losses_are_near_zero_for_a_confident_correct_mask():
    targets = torch.zeros(1, 16, 16, dtype=torch.uint8)
    targets[0, :8] = 1
    low = torch.full((1, 4, 4), -30.0)
    low[0, :2] = 30.0
    bce, dice = mask_losses(low, targets, torch.tensor([[16, 16]]))
    assert float(bce) < 1e-3 and float(dice) < 0.05
