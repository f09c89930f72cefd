"""The package version, read statically by the build (pyproject: ``[tool.setuptools.dynamic]``)."""

__version__ = "0.1.0"
