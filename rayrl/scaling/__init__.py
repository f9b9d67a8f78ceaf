"""Scaling laws for RL post-training (Tan et al.): fitting, protocols, planner, FitterActor.

Modules, one concept each: laws (the formulas), table (metric rows to points), fit (the
main law), bootstrap (whole-run resampling), protocols (intra/inter-model), compare (law
forms by held-out error), planner (eq. 5, 7, 9), figures, synthetic (known-law tables),
fitter (the Ray actor) and commands (`rayrl fit` / `rayrl plan`).
"""
