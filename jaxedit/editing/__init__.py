"""The editing core: keys and target values from the model, the preservation covariance C0, the one
preservation-memorisation solve, the editors (ROME, MEMIT, EMMET) and the scaling schedules."""
