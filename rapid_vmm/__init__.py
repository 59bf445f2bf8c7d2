"""rapid-vmm: the per-host VM Manager of a RAPID offloading cloud."""

import warnings

# futurist imports eventlet whenever it is installed (oslo.service still
# depends on it); rapid-vmm never uses it, so its deprecation banner is noise.
warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')

from oslo_service import backend as _service_backend  # noqa: E402

# rapid-vmm runs on native threads: whoever imports oslo.service through
# rapid-vmm without choosing a backend gets the threading one, not eventlet.
_service_backend.register_backend_default_hook(
    lambda: _service_backend.BackendType.THREADING)
