"""Tests of rapid_vmm.outbox: in-order, acknowledged delivery to peers.

The peers are in-process objects implementing the peer interface, so that
each test decides what the DS or the SLAM answers; the RPC peers over a
real broker are exercised by the functional tests.
"""

import threading
import time

import testtools

from rapid_vmm import exception
from rapid_vmm import flavors
from rapid_vmm import objects
from rapid_vmm import outbox
from rapid_vmm import peers
from rapid_vmm import state
from rapid_vmm.tests import fixtures as rfix

GRID = flavors.parse_grid('1,2 x 1024,2048 x 20')


class Peer(peers.DirectoryServer, peers.SlaManager):
    """Records what it receives; ``failures`` decides the next answers."""

    def __init__(self):
        self.received: list[tuple[str, dict]] = []
        self.failures: list[Exception] = []
        self.next_vm_id = 1000
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)

    def _take(self, method: str, kwargs: dict):
        with self.lock:
            if self.failures:
                raise self.failures.pop(0)
            self.received.append((method, kwargs))
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 10) -> list:
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f'got {self.received}')
                self.arrived.wait(remaining)
            return list(self.received)

    def register_vmm(self, ctxt, **kwargs):
        raise NotImplementedError

    def notify_vmm(self, ctxt, **kwargs):
        raise NotImplementedError

    def register_vm(self, ctxt, vmm_id, category, vm_type, user_id, status):
        self._take('register_vm', dict(vmm_id=vmm_id, user_id=user_id,
                                       status=status))
        with self.lock:
            self.next_vm_id += 1
            return {'vm_id': self.next_vm_id}

    def notify_vm(self, ctxt, vm_id, status):
        self._take('notify_vm', dict(vm_id=vm_id, status=status))

    def notify_helper(self, ctxt, vm_id, ip_address):
        self._take('notify_helper', dict(vm_id=vm_id, ip_address=ip_address))

    def vm_started(self, ctxt, host, vm):
        self._take('vm_started', dict(host=host, user_id=vm['user_id']))

    def vm_start_failed(self, ctxt, host, user_id, error, error_class):
        self._take('vm_start_failed', dict(user_id=user_id,
                                           error_class=error_class))


def unavailable():
    return exception.PeerUnavailable(peer='DS', method='m', reason='down')


def rejected():
    return exception.PeerRejected(peer='DS', method='m', reason='no')


class OutboxTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        conf_fixture = self.useFixture(rfix.ConfFixture(
            outbox_retry_max_interval=1, outbox_idle_interval=0.2,
            outbox_max_rejections=3))
        self.conf = conf_fixture.conf
        self.store = state.StateStore(conf_fixture.tempdir + '/data')
        self.store.open()
        self.addCleanup(self.store.close)
        self.identity: dict = {'vmm_id': 42}
        self.ds, self.slam = Peer(), Peer()
        self.stopping = threading.Event()
        self.vm_ids: list[tuple[str, int]] = []
        self.box = outbox.Outbox(
            self.conf, self.store, self.ds, self.slam, lambda: self.identity,
            self.stopping, on_vm_id=lambda key, vm_id: self.vm_ids.append(
                (key, vm_id)))
        self.addCleanup(self.box.stop)
        self.addCleanup(self.stopping.set)

    def vm(self, user_id, **fields):
        values = dict(user_id=user_id, name=f'rapid-vm-{user_id}', vcpus=1,
                      memory_mb=1024, disk_gb=20)
        values.update(fields)
        return self.store.save_vm(objects.Vm(**values))

    def wait_until_empty(self, timeout=10):
        """The last delivery is dequeued just after the peer got it."""
        deadline = time.monotonic() + timeout
        while self.box.depth() != {'ds': 0, 'slam': 0}:
            self.assertLess(time.monotonic(), deadline, self.box.depth())
            time.sleep(0.02)

    def queue(self, func, *args):
        with self.store.transaction() as txn:
            func(txn, *args)
        self.box.wake()

    def test_registers_then_fills_the_ds_id_into_later_messages(self):
        vm = self.vm(7)
        self.queue(outbox.queue_register_vm, vm, GRID)
        vm.status = objects.VmStatus.SUSPENDED
        self.queue(outbox.queue_notify_vm, vm)
        self.box.start()
        got = self.ds.wait_for(2)
        self.assertEqual(('register_vm', {'vmm_id': 42, 'user_id': 7,
                                          'status': 1}), got[0])
        self.assertEqual(('notify_vm', {'vm_id': 1001, 'status': 2}), got[1])
        self.assertEqual(1001, self.store.get_vm(7).vm_id)
        self.assertEqual([('rapid-vm-7', 1001)], self.vm_ids)
        self.wait_until_empty()

    def test_ds_messages_wait_for_the_vmm_id(self):
        self.identity = {}
        vm = self.vm(7)
        self.queue(outbox.queue_register_vm, vm, GRID)
        self.box.start()
        time.sleep(0.5)
        self.assertEqual([], self.ds.received)
        self.identity['vmm_id'] = 5
        self.box.wake()
        self.assertEqual(5, self.ds.wait_for(1)[0][1]['vmm_id'])

    def test_unavailable_peer_is_retried_in_order(self):
        vm = self.vm(7, vm_id=10)
        for status in (2, 3, 2):
            vm.status = status
            self.queue(outbox.queue_notify_vm, vm)
        self.ds.failures = [unavailable(), unavailable()]
        self.box.start()
        got = self.ds.wait_for(3)
        self.assertEqual([2, 3, 2], [kw['status'] for _, kw in got])
        self.assertEqual(0, self.box.given_up['ds'])

    def test_a_message_refused_again_and_again_is_given_up(self):
        vm = self.vm(7, vm_id=10)
        self.queue(outbox.queue_notify_vm, vm)
        vm.status = 4
        self.queue(outbox.queue_notify_vm, vm)
        self.ds.failures = [rejected(), rejected(), rejected()]
        self.box.start()
        got = self.ds.wait_for(1)
        self.assertEqual([('notify_vm', {'vm_id': 10, 'status': 4})], got)
        self.assertEqual(1, self.box.given_up['ds'])

    def test_register_is_never_sent_for_a_vm_with_a_ds_id(self):
        vm = self.vm(7)
        self.queue(outbox.queue_register_vm, vm, GRID)
        self.store.update_vm(7, vm_id=55)  # e.g. rebuilt from metadata
        self.queue(outbox.queue_notify_vm, vm)
        self.box.start()
        self.assertEqual([('notify_vm', {'vm_id': 55, 'status': 1})],
                         self.ds.wait_for(1))

    def test_vm_removed_before_registration_is_never_told(self):
        vm = self.vm(7)
        self.queue(outbox.queue_register_vm, vm, GRID)
        vm.status = 4
        self.queue(outbox.queue_notify_vm, vm)
        self.store.delete_vm(7)
        with self.store.transaction() as txn:
            txn.enqueue(outbox.DS, 'notify_vm', {'vm_id': 3, 'status': 4},
                        vm_key='other')
        self.box.start()
        self.assertEqual([('notify_vm', {'vm_id': 3, 'status': 4})],
                         self.ds.wait_for(1))
        self.wait_until_empty()

    def test_lanes_do_not_block_each_other(self):
        self.identity = {}  # the DS lane cannot deliver
        vm = self.vm(7)
        self.queue(outbox.queue_register_vm, vm, GRID)
        self.queue(outbox.queue_vm_started, 'host-a',
                   objects.Vm(user_id=7, name='x', vcpus=1, memory_mb=1,
                              disk_gb=1).to_record())
        self.box.start()
        self.assertEqual([('vm_started', {'host': 'host-a', 'user_id': 7})],
                         self.slam.wait_for(1))
        self.assertEqual(1, self.box.depth()['ds'])

    def test_current_state_after_registration(self):
        self.vm(-1, helper=1, ip_address='10.0.0.2')
        self.vm(7, vm_id=30, status=2)
        self.vm(8, task_state='building')
        with self.store.transaction() as txn:
            self.assertEqual(3, outbox.queue_current_state(txn, GRID))
            # a second pass does not register the helper twice
            self.assertEqual(2, outbox.queue_current_state(txn, GRID))
        methods = [(m.method, m.vm_key) for m in
                   self.store.outbox_messages('ds')]
        self.assertEqual([('register_vm', 'rapid-vm--1'),
                          ('notify_helper', 'rapid-vm--1'),
                          ('notify_vm', 'rapid-vm-7'),
                          ('notify_helper', 'rapid-vm--1'),
                          ('notify_vm', 'rapid-vm-7')], methods)
