"""tl: transfer learning for image classification, in stages.

images -> backbone -> cache -> heads -> reports; each stage is a plain function in this package.
"""

__version__ = "0.1.0"
