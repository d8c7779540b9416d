"""medtee: declarative confidential fine-tuning of medical language models."""

__version__ = "0.1.0"
