"""Framework-free evaluation over numpy arrays: metrics, calibration, the decision rule, the promotion gate, plots.

Modules (import the one you need; importing this package does nothing):
    decision     `decide` (the accept / reject / review rule shared with serving) and `tune_threshold`
    calibration  `softmax`, `fit_temperature`, `expected_calibration_error`, `reliability_bins`
    metrics      `evaluate_predictions`: classification and plant figures with grouped bootstrap intervals
    gate         `GateRules`, `GateResult`, `compare`, `comparison_markdown`: champion / challenger gate
    plots        `confusion_matrix_png`, `calibration_png`
"""
