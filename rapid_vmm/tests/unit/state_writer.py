"""Child process of the state durability test (not a test module).

``python -m rapid_vmm.tests.unit.state_writer DATA_PATH FIRST_USER_ID``
opens the state store and writes VM records in a loop until it is killed.
After each record is committed (save, then update, then meta) it prints
the user id on stdout and flushes, so the parent knows exactly which
records must have survived a ``kill -9``.
"""

import sys

from rapid_vmm import objects
from rapid_vmm import state


def record(user_id: int) -> objects.Vm:
    """The record the child writes for ``user_id`` (the parent checks it)."""
    return objects.Vm(user_id=user_id, name=f'rapid-vm-{user_id}-dur',
                      vcpus=1 + user_id % 4,
                      memory_mb=1024 * (1 + user_id % 3),
                      disk_gb=20, gpu_cores=user_id % 5,
                      ip_address=f'10.{user_id // 65536 % 256}.'
                                 f'{user_id // 256 % 256}.{user_id % 256}',
                      pending_resize={'vcpus': user_id, 'tag': 'x' * 64})


def main(argv: list[str]) -> int:
    data_path, first = argv[0], int(argv[1])
    store = state.StateStore(data_path)
    store.open()
    print('open', flush=True)
    user_id = first
    while True:
        store.save_vm(record(user_id))
        store.update_vm(user_id, status=objects.VmStatus.SUSPENDED,
                        as_ready=True)
        store.set_meta(last=user_id)
        sys.stdout.write(f'{user_id}\n')
        sys.stdout.flush()
        user_id += 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
