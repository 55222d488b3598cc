"""iis_study: the Inherent Interpretability Score of pre-trained vision representations."""

__version__ = "0.1.0"
