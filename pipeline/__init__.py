"""tl: transfer learning for image classification, in stages.

images -> backbone -> cache -> heads -> reports; each stage is a plain function in this package.
"""

__version__ = "0.1.0"

# --device and --precision values; here, free of torch, so the CLI can list them without importing it
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# --format values (see pipeline.datasets.open_source), here so the CLI lists them without importing the data stack
DATA_FORMATS = ("imagefolder", "csv", "cifar10", "gtsrb", "voc")

# --decode values (see pipeline.decoding); fast is the default: measured to cost no accuracy (bench/RESULTS.md)
DECODE_MODES = ("fast", "exact")
DEFAULT_DECODE = "fast"
