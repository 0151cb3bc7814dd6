"""deltafix's kernel sources (CUDA and C), shipped as the data of this package.

The folder holds no Python: it is a package only so that the sources travel in the wheel and the
sdist as package data and so that ``deltafix.kernels.sources`` can find them with
``importlib.resources``, from a source checkout (editable install) or an installed wheel alike.
See README.md here for what each file is and how it is built.
"""
