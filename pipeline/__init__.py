"""tl: transfer learning for image classification, in stages.

images -> backbone -> cache -> heads -> reports; each stage is a plain function in this package.
"""

__version__ = "0.1.0"

# --device and --precision values (see pipeline.hardware); here, free of torch, so the CLI lists them cheaply
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
