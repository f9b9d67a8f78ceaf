"""Scaling laws for RL post-training (Tan et al.): the maths and the fit document, with no
Ray and no argparse (the study side, rayrl/study/, runs them live).

Modules, one concept each: laws (the formulas), table (metric rows to points, and the one
rule for a law's rows), fit (the main law), bootstrap (whole-run resampling), protocols
(intra/inter-model), compare (law forms by held-out error), planner (eq. 5, 7, 9), figures,
synthetic (known-law tables) and document (fit.json, `rayrl fit` and `rayrl plan`).
"""
