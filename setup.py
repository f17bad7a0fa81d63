import re

from setuptools import find_packages, setup


def read_requirements(path):
  with open(path) as f:
    return [line.strip() for line in f if line.strip() and not line.startswith('#')]


with open('lapa_jax/__init__.py') as f:
  version = re.search(r"__version__ = '([^']+)'", f.read()).group(1)

# `pip install -e .[test]` adds pytest and the reference stacks of the parity tests (PyTorch,
# transformers); `pip install -e .[metaworld]` adds Meta-World (MuJoCo); `bash launch/test.sh` installs
# both from requirements-test.txt and requirements-metaworld.txt.
setup(
    name='lapa_jax',
    version=version,
    description='LAPA (Latent Action Pretraining from Videos) in JAX/Flax',
    packages=find_packages(include=['lapa_jax', 'lapa_jax.*']),
    python_requires='>=3.10',
    install_requires=read_requirements('requirements.txt'),
    extras_require={'test': read_requirements('requirements-test.txt'),
                    'metaworld': read_requirements('requirements-metaworld.txt')},
    entry_points={'console_scripts': ['lapa=lapa_jax.cli:main']},
)
