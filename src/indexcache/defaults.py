"""Every default of the CLI and the Python API, in one place."""

RATIO = 0.25
NUM_SAMPLES = 8
SEQ_LEN = 512
SEED = 0
SPLIT = "train"
TEXT_COLUMN = "text"
BATCH_SIZE = 1
STRATEGY = "cached"
STRATEGIES = ("naive", "cached", "pruned")
CACHE = "auto"
PRUNE_KEEP = 0.5
KERNELS = "auto"
DTYPE = "auto"
DEVICE = "auto"
OUTPUT = "pattern.json"
DISTILL_LR = 1e-3
DISTILL_OBJECTIVE = "multi"
DISTILL_NUM_SAMPLES = 64  # training windows (default data: the pattern's calibration source, past held-out)
DISTILL_SAVE_EVERY = 50
DISTILL_GRAD_CLIP = 1.0
