"""Training: the step loop, a run (fresh or resumed), the learning-rate schedule, the saver and
its signal handling."""
