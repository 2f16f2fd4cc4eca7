"""fengshen-batch: offline batch scoring and generation for the Fengshenbang GPT2-3.5B models on Ray."""

__version__ = "0.1.0"
