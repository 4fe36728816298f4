"""Training: fit, callbacks, phases, peers, step progress, the run end and the export it ends with."""
