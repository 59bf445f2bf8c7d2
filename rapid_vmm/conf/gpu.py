"""Options of the [gpu] group (host GPU monitoring)."""

from oslo_config import cfg

from rapid_vmm.conf import groups

gpu_group = cfg.OptGroup(
    'gpu', title='GPU monitoring',
    help='How the host\'s NVIDIA GPUs are read and reported.')

gpu_opts = [
    cfg.StrOpt('backend', default='auto',
               choices=[('auto', 'NVML, else nvidia-smi, else none'),
                        ('nvml', 'NVML through pynvml only'),
                        ('nvidia-smi', 'the nvidia-smi tool only'),
                        ('none', 'no GPU reporting')],
               help='Where GPU readings come from.'),
    cfg.ListOpt('devices', default=['all'],
                help='GPU indexes to report, e.g. ``0,2``; ``all`` reports '
                     'every GPU.'),
    cfg.IntOpt('total_cores', default=0, min=0,
               help='GPU cores reported to the Directory Server and shared '
                    'by VMs (through GVirtuS); 0 = no accounting.'),
    cfg.StrOpt('nvidia_smi_path', default='nvidia-smi',
               help='Path of the nvidia-smi tool used by the fallback '
                    'backend.'),
    cfg.IntOpt('nvidia_smi_timeout', default=5, min=1,
               help='Seconds one run of nvidia-smi may take.'),
    cfg.FloatOpt('sample_timeout', default=5.0, min=0.1,
                 help='Seconds one GPU sample (NVML, or a run of '
                      'nvidia-smi) may take before the report goes on '
                      'without GPU figures (``gpu_error`` says why). A call '
                      'stuck in the driver is left to finish in the '
                      'background; until it returns, reports carry no GPU '
                      'and do not wait for it again. Default 5.'),
    cfg.BoolOpt('extra_metrics', default=True,
                help='Also read the temperature and power draw of each '
                     'GPU.'),
]



def register_opts(conf: cfg.ConfigOpts) -> None:
    groups.register_group(conf, gpu_group, gpu_opts)


def list_opts() -> dict:
    return {gpu_group: gpu_opts}
