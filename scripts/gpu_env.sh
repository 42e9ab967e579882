# Source this on the GPU machine, from the repository root: `source scripts/gpu_env.sh`.
# Installs the carried wheels (transformers 5.24, datasets and their small deps; the image has
# torch, triton, typer and rich) and this checkout (non-editable, so the package-dir mapping of calib/,
# kernels/ and patterns/ holds), both under /tmp, and puts them on PYTHONPATH.
# Wheels: $WHEELS, else ./.whl, else the .whl folder two levels up (a worktree under .work/).
wheels=${WHEELS:-}
[ -n "$wheels" ] || { [ -d .whl ] && wheels=.whl; } || true
[ -n "$wheels" ] || { [ -d ../../.whl ] && wheels=../../.whl; } || true
[ -n "$wheels" ] || { echo "gpu_env.sh: no wheel folder (.whl) carried" >&2; return 1; }
rm -rf /tmp/site /tmp/pkg
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/pkg . \
  || { echo "gpu_env.sh: install failed" >&2; return 1; }
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 PATH=/tmp/pkg/bin:$PATH
python3 -c "import torch, transformers, indexcache; print('gpu_env:', torch.__version__, transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
