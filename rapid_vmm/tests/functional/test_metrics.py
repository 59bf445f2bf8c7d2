"""The Prometheus endpoint of the agent as a process, scraped over HTTP and
compared with what get_host_status, get_vm_usage and the DS give."""

import http.client
import socket

from prometheus_client import parser
import testtools

from rapid_vmm.tests.functional import agent as agent_fixture

LINUX = 0
MiB = 1024 ** 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class TestMetrics(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.port = free_port()
        # One host sample for the whole test (the first report), so the
        # scrape and the RPC answers hold the same figures.
        self.agent = self.useFixture(agent_fixture.AgentProcess(**{
            'metrics.enabled': True, 'metrics.port': self.port,
            'metrics.bind_host': '127.0.0.1', 'report_interval': 3600}))
        self.agent.start()

    def scrape(self) -> tuple[str, dict]:
        connection = http.client.HTTPConnection('127.0.0.1', self.port,
                                                timeout=30)
        connection.request('GET', '/metrics')
        response = connection.getresponse()
        body = response.read().decode()
        self.assertEqual(200, response.status, body)
        self.assertTrue(response.getheader('Content-Type').startswith(
            'text/plain'))
        samples = {}
        for family in parser.text_string_to_metric_families(body):
            for sample in family.samples:
                samples[(sample.name,
                         tuple(sorted(sample.labels.items())))] = sample.value
        return body, samples

    def test_scrape_matches_the_api_and_the_ds(self):
        api = self.agent.api
        ds = self.agent.ds.recorder
        ds.wait_for('notify_vmm', timeout=30)
        vm = api.start_vm({}, user_id=41, os_type=LINUX, vcpus=2,
                          memory_mb=2048)
        for _ in range(3):
            before = api.get_host_status({})
            body, samples = self.scrape()
            after = api.get_host_status({})
            if before['resources'] == after['resources']:
                break
        status = after
        res = status['resources']

        def value(name, **labels):
            key = (f'rapid_vmm_{name}',
                   tuple(sorted((k, str(v)) for k, v in labels.items())))
            self.assertIn(key, samples, body[-3000:])
            return samples[key]

        self.assertEqual(1, value('info', host=status['host'],
                                  driver=status['driver'],
                                  version=status['version'],
                                  vmm_id=status['vmm_id']))
        self.assertEqual(res['cpu_load_percent'],
                         value('host_cpu_load_percent'))
        self.assertEqual(res['cpu_count'], value('host_cpus'))
        self.assertEqual(res['memory_total_mb'] * MiB,
                         value('host_memory_total_bytes'))
        self.assertEqual(res['memory_free_mb'] * MiB,
                         value('host_memory_free_bytes'))
        self.assertEqual(res['disk_free_gb'] * 1024 ** 3,
                         value('host_disk_free_bytes'))
        self.assertEqual(res['vms_running'], value('vms', state='running'))
        self.assertEqual(1, value('registered', peer='ds'))
        self.assertEqual(1, value('driver_reachable'))
        for vm_type in res['available_types']:
            vcpus, memory_mb, disk_gb = vm_type
            self.assertEqual(1, value('vm_type_fits', vcpus=vcpus,
                                      memory_mb=memory_mb, disk_gb=disk_gb))
        # The same numbers the DS got in its last report.
        ds.wait_for('notify_vmm', lambda kw: kw['resources'] == res,
                    timeout=10)
        # The VM: its record and its usage.
        labels = {'user_id': 41, 'vm': vm['name']}
        self.assertEqual(1, value('vm_status', **labels))
        self.assertEqual(2, value('vm_vcpus', **labels))
        self.assertEqual(2048 * MiB, value('vm_memory_bytes', **labels))
        [disk] = api.get_vm_usage({}, resource='disk', user_id=41)
        self.assertEqual(disk['capacity_bytes'],
                         value('vm_disk_capacity_bytes', **labels))
        self.assertEqual(1, value('scrape_collector_success',
                                  collector='host'))
        self.assertEqual(1, value('scrape_collector_success',
                                  collector='usage'))
        self.assertLess(value('scrape_duration_seconds'), 5)
