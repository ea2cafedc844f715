"""compress: make Transformer models smaller and faster without losing accuracy.

Every stage is a plain function from artifact directory to artifact directory; the CLI
(`compress ...`), the recipe runner (`compress run`) and this Python API call the same
functions with the same typed configs.
"""

__version__ = "0.1.0"
