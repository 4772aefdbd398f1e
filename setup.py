"""What pyproject.toml cannot say: the guide ships inside the package, from docs/ itself (one copy of each file).

``lightning-precision docs TOPIC`` reads it there (``lightning_precision/_docs/*.md`` in a wheel); a source checkout
or an editable install reads ``docs/``. ``packages.find`` cannot list a package whose folder is mapped elsewhere, so
the package list is made here: every ``lightning_precision*`` package, as ``packages.find`` did, plus ``_docs``.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[*find_namespace_packages(include=["lightning_precision*"]), "lightning_precision._docs"],
    package_dir={"lightning_precision._docs": "docs"},
    package_data={"lightning_precision._docs": ["*.md"]},
)
