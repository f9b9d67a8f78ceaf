"""Rollout side of a run: vLLM engines as Ray actors and the learner -> vLLM weight sync.

worker.py (one engine), worker_ext.py (code inside vLLM's worker), sync.py (the
bucketed broadcast), pool.py (the pool the trainer drives).
"""
