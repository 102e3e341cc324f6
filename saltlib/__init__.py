"""saltlib: salt-body segmentation for the TGS Salt Identification Challenge.

Modules:
    rle       -- Kaggle run-length encoding of masks.
    metric    -- the competition metric (mean precision over IoU thresholds) and cut-off sweeps.
    data      -- loading and validating a Kaggle-layout data folder, stratified folds.
    losses    -- Lovász hinge, BCE on logits, losses chosen by name.
    model     -- the ResNet-U-Net (image-level head, scSE blocks, hypercolumn as options).
    augment   -- augmentation and input pipelines (tf.data; numpy for other backends).
    train     -- resumable, staged training of one fold; out-of-fold predictions.
    distribute -- tf.distribute strategies chosen by name (multi-GPU, multi-worker).
    evaluate  -- the post-processing choice, nested CV and the metrics record of notebook 03.
    predict   -- bundles, TTA, cut-offs, small-mask removal, submissions.
    litert    -- bundles run with TensorFlow Lite on CPUs without native bfloat16.
    viz       -- the notebooks' figures.
    hardware  -- whether bfloat16 is native here; the CPU and GPUs a run records.
    io        -- atomic writes and JSON files.
    params, runner, ship, cli -- parameter checking, papermill runs, shipped bundles, the ``salt`` command.
"""

__version__ = "0.1.0"
