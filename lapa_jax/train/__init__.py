"""Training: one generic loop (loop.py), the optimizer (optim.py) and one small file per stage.

A stage module `lapa_jax.train.<name>` exposes `make_stage(config) -> loop.Stage`; the config's
`stage` field names it, and `lapa train configs/<name>.py:<preset> --workdir DIR` runs it.
"""
