"""Masked networks made genuinely smaller (`compact`) and their sizes in params and MACs (`accounting`)."""
