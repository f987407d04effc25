"""Integrations with other tools (optional extras): `s2t_hf.integrations.lm_eval` (lm-evaluation-harness)."""
