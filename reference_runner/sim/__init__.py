"""SimNPUGraph: NPUGraph's semantics on the CPU (`graph`), its memory pool (`pool`), the typed program a
capture records (`recording`), and compiled mode's piecewise inductor compilation of it (`piecewise`)."""
