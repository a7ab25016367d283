# Source this at the start of a device command on the GPU host (Python 3.12, no package access):
#   . tools/gpu/setup_host.sh
# It unpacks the GL dispatch libraries (.gl/), the LIBERO simulator bundle (.bundle/sim312.tar.xz, built here by
# ../shared/tools/sim_bundle.py) and the few wheels the host lacks (.whl/), and puts vla_bench on the path.
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
mkdir -p /tmp/site
[ -f .bundle/sim312.tar.xz ] && tar -xJf .bundle/sim312.tar.xz -C /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl OPENBLAS_NUM_THREADS=1 PYTHONUNBUFFERED=1
[ -d /usr/local/nvidia/share/glvnd/egl_vendor.d ] && export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
# the pytest plugin is registered by pip's entry point where vla-bench is installed; here, load it by name
export PYTEST_ADDOPTS="-p vla_bench.plugin -p no:cacheprovider"
