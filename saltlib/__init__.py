"""saltlib: salt-body segmentation for the TGS Salt Identification Challenge.

Modules:
    rle       -- Kaggle run-length encoding of masks.
    metric    -- the competition metric (mean precision over IoU thresholds) and cut-off sweeps.
    data      -- loading and validating a Kaggle-layout data folder, stratified folds.
    losses    -- Lovász hinge, BCE on logits, losses chosen by name.
    model     -- the ResNet-U-Net.
    augment   -- augmentation and input pipelines (tf.data; numpy for other backends).
    train     -- resumable, staged training of one fold.
    postprocess, predict -- cut-offs, TTA, small-mask removal, submissions.
    params, runner, cli -- parameter checking and papermill runs (``salt`` command).
"""

__version__ = "0.1.0"
