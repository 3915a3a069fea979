"""treadle.engine: executes ops for one base model on one device (trainer, losses, sampler, scheduler)."""
