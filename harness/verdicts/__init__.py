"""Verdicts: token-by-token comparison (`compare`), the tolerances it applies (`tolerances`) and the MoE
router near-ties of engines that do not report their routing (`routing`)."""
