"""Verdicts: token-by-token comparison (`compare`), the tolerances it applies (`tolerances`), the MoE router
near-ties of engines that do not report their routing (`routing`), and the drift over a scenario's compared steps
(`drift`), judged against the noise profiles of correct runs (`noise`) and stored figures (`drift_baseline`)."""
