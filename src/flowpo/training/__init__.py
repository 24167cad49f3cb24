"""Training infrastructure: the loop (trainer), processes (distributed), what a checkpoint holds
(state, checkpoint), the optimizer and EMA, and the run log."""
