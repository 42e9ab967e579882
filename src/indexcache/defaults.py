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
# `--kernels auto` on CUDA: windows shorter than this run stock transformers with sdpa, longer ones the Triton
# kernels with absorbed MLA attention. PROVISIONAL until measured on the GPU.
TRITON_MIN_SEQ_LEN = 4096
BENCH_CONTEXTS = "32768,131072"
BENCH_LAYERS = 4
BENCH_REPS = 3
