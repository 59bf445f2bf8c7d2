"""The image pool: disks prepared ahead, taken by start_vm, crash-safe."""

import json
import os
import subprocess

import testtools

from rapid_vmm.tests import fixtures as rfix
from rapid_vmm.virt.libvirt import imagebackend
from rapid_vmm.virt.libvirt import imagepool

GiB = 1024 ** 3


def qemu_info(path):
    out = subprocess.run(['qemu-img', 'info', '--output=json', '-U', path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


class TestImagePool(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf_fixture = self.useFixture(rfix.ConfFixture())
        self.images_path = os.path.join(self.conf_fixture.tempdir, 'images')
        self.images = imagebackend.ImageBackend(self.images_path)
        self.images.ensure_directory()
        self.pool = imagepool.ImagePool(self.images,
                                        self.conf_fixture.template, size=3,
                                        size_gb=20)
        self.addCleanup(self.pool.stop)

    def test_refill_makes_complete_overlays_of_the_template(self):
        self.assertEqual(3, self.pool.refill())
        ready = self.pool.ready()
        self.assertEqual(3, len(ready))
        for path in ready:
            info = qemu_info(path)
            self.assertEqual(os.path.abspath(self.conf_fixture.template),
                             info['backing-filename'])
            self.assertEqual(20 * GiB, info['virtual-size'])
        self.assertEqual(0, self.pool.refill())

    def test_take_moves_a_disk_and_grows_it(self):
        self.pool.refill()
        target = os.path.join(self.images_path, 'rapid-vm-1-abc.qcow2')
        self.assertTrue(self.pool.take(target, 40))
        self.assertEqual(40 * GiB, qemu_info(target)['virtual-size'])
        self.assertEqual(2, len(self.pool.ready()))

    def test_take_from_an_empty_pool_says_so(self):
        target = os.path.join(self.images_path, 'rapid-vm-2-abc.qcow2')
        self.assertFalse(self.pool.take(target, 20))
        self.assertFalse(os.path.exists(target))

    def test_background_thread_refills_after_a_take(self):
        self.pool.start()
        self._wait(lambda: len(self.pool.ready()) == 3)
        self.pool.take(os.path.join(self.images_path,
                                    'rapid-vm-3-abc.qcow2'), 20)
        self._wait(lambda: len(self.pool.ready()) == 3)

    def test_other_templates_and_partial_files_are_not_ready(self):
        self.pool.refill()
        other = imagepool.ImagePool(self.images, '/elsewhere/t.qcow2', 1, 20)
        self.assertEqual([], other.ready())
        partial = self.pool.ready()[0] + '.part'
        os.rename(self.pool.ready()[0], partial)
        self.assertEqual(2, len(self.pool.ready()))
        self.assertFalse(self.pool.is_pool_file(partial))

    def _wait(self, predicate, timeout=20):
        import time
        deadline = time.monotonic() + timeout
        while not predicate():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)


class TestPoolInTheAgent(testtools.TestCase):

    def test_start_vm_uses_the_pool_and_restart_keeps_complete_disks(self):
        f = self.useFixture(rfix.ServiceFixture(
            **{'libvirt.image_pool_size': 2}))
        images = os.path.join(f.conf.data_path, 'instances')

        def pool_files():
            return sorted(n for n in os.listdir(images)
                          if n.startswith(imagepool.POOL_PREFIX) and
                          not n.endswith('.part'))

        self._wait(lambda: len(pool_files()) == 2)
        before = pool_files()
        vm = f.api.start_vm({}, user_id=5, os_type=0, vcpus=1,
                            memory_mb=1024, disk_gb=40)
        disk = f.manager.store.get_vm(5).disk_path
        self.assertEqual(os.path.join(images, vm['name'] + '.qcow2'), disk)
        self.assertEqual(40 * GiB, qemu_info(disk)['virtual-size'])
        self.assertEqual(1, len(set(before) - set(pool_files())))
        self._wait(lambda: len(pool_files()) == 2)
        # A half-made pool disk (crash), left long enough, is an orphan:
        # moved aside (not deleted); complete ones stay.
        partial = os.path.join(images, pool_files()[0] + '.part')
        with open(partial, 'wb') as part:
            part.write(b'half')
        os.utime(partial, (1, 1))
        complete = pool_files()
        self.assertIn(partial, f.manager.driver.cleanup_orphans(set()))
        self.assertFalse(os.path.exists(partial))
        aside = os.listdir(os.path.join(images, '.orphans'))
        self.assertEqual([os.path.basename(partial)],
                         [name.split('-', 1)[1] for name in aside])
        f.restart()
        self.assertTrue(set(complete) <= set(pool_files()))

    def _wait(self, predicate, timeout=30):
        import time
        deadline = time.monotonic() + timeout
        while not predicate():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
