"""Pure Flax linen models; no I/O."""
