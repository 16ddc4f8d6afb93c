"""Human labelling of the online trainer's sampling rounds: ``diffpo label RUN_DIR``."""
