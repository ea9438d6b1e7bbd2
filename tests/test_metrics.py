import pytest
import torch

from ppcr.eval.metrics import SegmentationMetrics, mask_iou_parts


def m(h, w, *boxes):
    x = torch.zeros(h, w, dtype=torch.bool)
    for y0, y1, x0, x1 in boxes:
        x[y0:y1, x0:x1] = True
    return x


def test_hand_computed_ciou_giou_precision_and_box_accuracy():
    metrics = SegmentationMetrics()
    # 1: I = 4, U = 12 -> 1/3     2: perfect (I = U = 9)      3: empty prediction, target of 4 -> 0
    # 4: both empty -> 1 (and adds nothing to cIoU's sums)
    ious = [
        metrics.update(m(4, 4, (0, 2, 0, 4)), m(4, 4, (0, 2, 0, 2), (2, 4, 0, 2))),
        metrics.update(
            m(5, 5, (0, 3, 0, 3)),
            m(5, 5, (0, 3, 0, 3)),
            torch.tensor([0.3, 0.3, 0.6, 0.6]),
            torch.tensor([0.3, 0.3, 0.6, 0.6]),
        ),
        metrics.update(
            m(4, 4), m(4, 4, (0, 2, 0, 2)), torch.tensor([0.25, 0.25, 0.5, 0.5]), torch.tensor([0.75, 0.75, 0.5, 0.5])
        ),
        metrics.update(m(3, 3), m(3, 3)),
    ]
    assert ious == [pytest.approx(1 / 3), 1.0, 0.0, 1.0]
    r = metrics.result()
    assert r["count"] == 4
    assert r["cIoU"] == pytest.approx((4 + 9 + 0 + 0) / (12 + 9 + 4 + 0))
    assert r["gIoU"] == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)
    assert r["Prec@0.5"] == pytest.approx(2 / 4)
    assert r["Prec@0.9"] == pytest.approx(2 / 4)
    assert r["BoxAcc@0.5"] == pytest.approx(1 / 4)  # only expressions with a box hit count as hits


def test_empty_target_with_a_prediction_scores_zero_and_sizes_must_match():
    metrics = SegmentationMetrics()
    assert metrics.update(m(4, 4, (0, 1, 0, 1)), m(4, 4)) == 0.0
    assert metrics.result()["cIoU"] == 0.0
    with pytest.raises(ValueError, match="mask sizes differ"):
        mask_iou_parts(m(4, 4), m(4, 5))


def test_reduce_without_a_process_group_keeps_the_counts():
    metrics = SegmentationMetrics()
    metrics.update(m(2, 2, (0, 1, 0, 1)), m(2, 2, (0, 1, 0, 2)))
    assert metrics.reduce().result()["cIoU"] == pytest.approx(0.5)


def test_one_rule_for_masks_and_boxes_an_iou_at_the_threshold_is_a_hit_and_missing_ones_are_misses():
    m = SegmentationMetrics()
    target, pred = torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    target[0, :4], pred[0, :2] = True, True  # I = 2, U = 4
    box, half = torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0.375, 0.5, 0.25, 0.5])  # IoU exactly 0.5
    assert m.update(pred, target, half, box) == 0.5
    r = m.result()
    assert r["Prec@0.5"] == 1.0 and r["Prec@0.6"] == 0.0 and r["BoxAcc@0.5"] == 1.0
    m.add_missing(3)
    r = m.result()
    assert r["count"] == 4 and r["missing"] == 3
    assert r["gIoU"] == pytest.approx(0.5 / 4) and r["Prec@0.5"] == 0.25 and r["BoxAcc@0.5"] == 0.25
    assert r["cIoU"] == pytest.approx(0.5)  # the missing ones' pixels are unknown: cIoU leaves them out
