"""The experiment pipeline that ``bs-unlearn demo``, ``bs-unlearn tofu`` and any comparison of methods share, one
module per step (docs/math.md, "Matched forgetting" and "Evaluation protocol"):

    run_specs          "bs-t:lam=0.5,lr=1e-4" -> RunSpec: a method, its options, its label
    finetune_stage     fine-tune on QA files (the start: forget + retain; the retain-only reference: retain alone)
    belief_band_stage  the start model's own high-likelihood answers other than the target (the probe's band)
    unlearn_stage      one method from the start model, with the squeezing probe; stops at a forgetting target
    matched_stage      unlearn_stage over a small lr grid; keeps the first lr (smallest first) that reaches the
                       target, or with lr_search="all" the one with the least retain damage
    model_cache        fine-tuned start / retain-only models built once, kept in a cache folder by key
    evaluate_stage     TOFU's and the paper's metrics of a model (bs_unlearn.metrics.evaluate)
    comparison         run_comparison: all of the above for a list of run specs, with plots
    tables             the equal-steps and matched-forgetting tables
    seed_tables        over seeds: each method's mean with a t interval, its paired difference from GradDiff
    results            the one writer of results.json and table.md
    progress           progress lines (``say``) and the timings of the stages

Every stage takes plain values (records, paths, models) and returns plain values (dicts that go to results.json).
"""
