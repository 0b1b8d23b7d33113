"""fmtrain: long-context language-model pretraining with Fast Multipole Attention."""
__version__ = "0.1.0"
