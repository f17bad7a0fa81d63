"""Importers for released weights (official LAQ .pt, ...); `lapa convert <source> ...`."""
