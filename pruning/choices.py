"""The names pruning's functions accept, in a module that imports nothing.

`pruning.plan`, `pruning.allocation` and `pruning.export` import their names from
here, and so does a command line that offers them as choices without importing
Keras (`experiments.config`)."""

RATIO_RANGE = (0.0, 1.0)  # a ratio (fraction of a conv's filters removed) is in [low, high): pruning.check_ratio
ROUND_MODES = ("nearest", "down")  # PrunePlan.from_scores(round_mode=)
ALLOCATIONS = ("uniform", "global", "sensitivity")  # pruning.allocation.allocate(allocation=)
TARGET_METRICS = ("macs", "params", "latency")  # pruning.allocation.METRICS: what a target keeps a fraction of
EXPORT_FORMATS = ("litert", "saved_model", "onnx")  # pruning.export.FORMATS
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")  # pruning.export (LiteRT only)
EXTENSIONS = {"litert": ".tflite", "saved_model": "", "onnx": ".onnx"}  # of each export format (a SavedModel is a folder)
