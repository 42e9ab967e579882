"""Every default of the CLI and the Python API, in one place."""

RATIO = 0.25
NUM_SAMPLES = 8
SEQ_LEN = 512
SEED = 0
SPLIT = "train"
TEXT_COLUMN = "text"
BATCH_SIZE = 1
STRATEGY = "cached"
STRATEGIES = ("naive", "cached", "pruned", "overlap")
CACHE = "auto"
PRUNE_KEEP = 0.5
KERNELS = "auto"
DTYPE = "auto"
DEVICE = "auto"
OUTPUT = "pattern.json"
