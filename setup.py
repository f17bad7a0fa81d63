import re

from setuptools import find_packages, setup

with open('requirements.txt') as f:
  requirements = [line.strip() for line in f if line.strip() and not line.startswith('#')]
with open('lapa_jax/__init__.py') as f:
  version = re.search(r"__version__ = '([^']+)'", f.read()).group(1)

# pytest is in requirements.txt so that `bash launch/test.sh` needs nothing else; the extras name
# the optional reference stacks used by parity tests.
setup(
    name='lapa_jax',
    version=version,
    description='LAPA (Latent Action Pretraining from Videos) in JAX/Flax',
    packages=find_packages(include=['lapa_jax', 'lapa_jax.*']),
    python_requires='>=3.10',
    install_requires=requirements,
    entry_points={'console_scripts': ['lapa=lapa_jax.cli:main']},
)
