"""Every default of the CLI and the Python API, in one place."""

RATIO = 0.25
NUM_SAMPLES = 8
SEQ_LEN = None  # from the model: max(QUICK_SEQ_LEN, SEQ_LEN_PER_TOPK × index_topk)
QUICK_SEQ_LEN = 512
SEQ_LEN_PER_TOPK = 4
WINDOWS = "packed"
WINDOW_KINDS = ("packed", "document")
WINDOW_BLOCK = 64  # windows are shuffled within blocks of this many, so reading stops after the blocks needed
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
