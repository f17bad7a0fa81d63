"""`lapa convert <source> ...`: import released weights; one importer module per source.

Each importer is a module with `main(argv) -> int`; add a line to CONVERTERS for a new source.
"""

from __future__ import annotations

import sys

from lapa_jax import cli

CONVERTERS = {
    # source: (module, one-line help)
    'official-laq': ('lapa_jax.convert.official_laq',
                     'official PyTorch LAQ state dict (.pt without PyTorch, or .npz) -> LAQ checkpoint'),
    'easylm': ('lapa_jax.convert.easylm', 'EasyLM/LWM/LAPA streaming params <-> lapa_jax checkpoint (import|export)'),
    'lwm-vqgan': ('lapa_jax.convert.lwm_vqgan', 'pickled LWM VQGAN params <-> lapa_jax checkpoint'),
    'hf-llama': ('lapa_jax.convert.hf_llama', 'Hugging Face LLaMA (config.json + safetensors) -> lapa_jax checkpoint'),
}


def main(argv: list[str]) -> int:
  return cli.dispatch('lapa convert', CONVERTERS, argv, noun='source')


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
