"""Options of the [metrics] group (Prometheus endpoint)."""

from oslo_config import cfg

from rapid_vmm.conf import groups

metrics_group = cfg.OptGroup(
    'metrics', title='Prometheus metrics',
    help='An HTTP endpoint with the host, GPU and per-VM figures of the '
         'agent in the Prometheus text format (the numbers the Directory '
         'Server gets). Off by default.')

metrics_opts = [
    cfg.BoolOpt('enabled', default=False,
                help='Serve the metrics endpoint.'),
    cfg.HostAddressOpt('bind_host', default='127.0.0.1',
                       help='Address the endpoint listens on. Default: '
                            'loopback only; set the address of the '
                            'network Prometheus scrapes from, or 0.0.0.0.'),
    cfg.PortOpt('port', default=9179,
                help='TCP port of the endpoint (any path answers; '
                     'Prometheus uses ``/metrics``).'),
    cfg.FloatOpt('scrape_timeout', default=5.0, min=0.1,
                 help='Seconds a scrape may spend reading the figures. A '
                      'hypervisor that does not answer in time gives a '
                      'scrape without the per-VM usage and '
                      '``rapid_vmm_scrape_collector_success{collector='
                      '"usage"} 0``; a scrape never waits longer, and no '
                      'second reading starts while one is stuck.'),
    cfg.BoolOpt('vm_usage', default=True,
                help='Include the per-VM usage of ``get_vm_usage`` (CPU, '
                     'memory, disk) in each scrape. With the libvirt driver '
                     'it is one bulk call per resource; with Nova it is one '
                     'diagnostics request per server and resource, so turn '
                     'it off on large Nova hosts.'),
    cfg.IntOpt('max_connections', default=4, min=1, max=100,
               help='HTTP requests served at once; more are refused. Each '
                    'connection may stay idle for at most 10 seconds.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    groups.register_group(conf, metrics_group, metrics_opts)


def list_opts() -> dict:
    return {metrics_group: metrics_opts}
