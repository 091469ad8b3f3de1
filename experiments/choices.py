"""The names and sizes the experiment modules accept, in a module that imports nothing.

Each is defined here once; the module that uses it (named beside it) imports it from
here, and so does `experiments.config`, which builds the command line's choices
without importing TensorFlow."""

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")  # experiments.distribute.get_strategy
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # experiments.distribute.set_mixed_precision
PREPROCESSING = ("vgg16", "cifar10", "cifar100", "unit", "none")  # experiments.data.preprocessing
FLIPS = ("none", "horizontal", "both")  # experiments.data.random_flips
POOLINGS = ("avg", "flatten")  # experiments.models.rice_classifier
WEIGHTS_CHOICES = ("auto", "imagenet", "hed", "none")  # experiments.models.vgg16_base (or a weights file)
# Convs per block of VGG16 (experiments.models' CIFAR net and keras.applications.VGG16 alike), for the
# block-wise pruning schedule and the names block<b>_conv<i>.
VGG16_BLOCKS = (2, 2, 3, 3, 3)
