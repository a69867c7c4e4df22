"""Learning curves: a training log as one table over steps, and the figure the UI and report show."""
import cv2
import numpy as np

from ad_models.report import learning_curve_png
from ad_models.runs import learning_curve


def test_iteration_methods_put_losses_and_bank_scores_on_one_step_axis():
    log = {"loss_every_iterations": 50, "loss_per_epoch": [[0.5, 0.25], [0.25, 0.125], [0.125, 0.0625], [0.1, 0.05]],
           "checkpoint_selection": [{"epoch": 100, "image_auroc": 0.7, "pixel_auroc": 0.8},
                                    {"epoch": 175, "image_auroc": 0.9, "pixel_auroc": 0.85},
                                    {"epoch": 200, "image_auroc": 0.8, "pixel_auroc": 0.9}],
           "selected_epoch": 175}
    curve = learning_curve(log)
    assert curve.step.tolist() == [50, 100, 150, 175, 200] and set(curve.unit) == {"iteration"}
    assert curve.loss.isna().tolist() == [False, False, False, True, False]  # 175: a checkpoint between loss rows
    assert curve.loss.dropna().tolist() == [0.75, 0.375, 0.1875, 0.15000000000000002]
    assert curve.bank_image_auroc.notna().tolist() == [False, True, False, True, True]
    assert curve.step[curve.selected].tolist() == [175]


def test_methods_without_selection_still_get_a_loss_curve_and_a_figure():
    curve = learning_curve({"loss_per_epoch": [[1.0], [0.5], [0.2]]})
    assert curve.step.tolist() == [1, 2, 3] and set(curve.unit) == {"epoch"} and not curve.selected.any()
    assert curve.bank_image_auroc.isna().all()
    image = cv2.imdecode(np.frombuffer(learning_curve_png(curve, "pfm"), np.uint8), cv2.IMREAD_COLOR)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_a_log_with_neither_losses_nor_checkpoints_is_an_empty_curve():
    curve = learning_curve({"train_seconds": 0.1})  # the mean-image baseline's
    assert curve.empty and list(curve.columns) == ["step", "unit", "loss", "bank_image_auroc", "bank_pixel_auroc",
                                                   "selected"]
