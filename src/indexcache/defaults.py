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
STRATEGIES = ("naive", "cached", "pruned", "overlap")
CACHE = "auto"
PRUNE_KEEP = 0.5
KERNELS = "auto"
DTYPE = "auto"
DEVICE = "auto"
# Under torchrun: a collective that waits longer fails and ends every rank (a hung rank never hangs the run). It
# must cover the slowest rank's model load before the first exchange and the imbalance of one step's shares.
COLLECTIVE_TIMEOUT_S = 1800
# --pipeline-stages: the fraction of each GPU left free of weights for the activations of a run (one window's
# layer at a time) when deciding how many layers a stage may hold.
STAGE_MEMORY_RESERVE = 0.1
OUTPUT = "pattern.json"
# `--kernels auto` on CUDA: windows shorter than this run stock transformers with sdpa, longer ones the Triton
# kernels with absorbed MLA attention. Measured crossover (scripts/results/bench_model_H100_2026-11-25.json,
# section "crossover", all-F per layer, H100): GLM-5 shapes sdpa/Triton 0.90× at 1K, 1.18× at 2K; DeepSeek-V3.2
# 0.76× at 1K, 1.01× at 2K. Triton is at least as fast from 2K on for both.
TRITON_MIN_SEQ_LEN = 2048
BENCH_CONTEXTS = "32768,131072"
BENCH_LAYERS = 4
BENCH_BATCHES = "1"  # --decode: sequences per decode step
BENCH_REPS = 3
DISTILL_LR = 1e-3
DISTILL_OBJECTIVE = "multi"
DISTILL_NUM_SAMPLES = 64  # training windows (default data: the pattern's calibration source, past held-out)
DISTILL_SAVE_EVERY = 50
DISTILL_GRAD_CLIP = 1.0
