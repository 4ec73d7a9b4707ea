"""Evaluation of trained backbones: the verification protocol (`verification`), sharded
embedding of image sets (`embedding`) and reports (`report`: tables, ROC plots, JSON)."""
