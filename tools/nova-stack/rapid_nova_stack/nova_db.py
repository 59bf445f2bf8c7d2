"""Set up nova's databases in one process, for stack.sh start.

Equivalent to ``nova-manage api_db sync``, ``cell_v2 map_cell0``,
``cell_v2 create_cell --name cell1`` and ``db sync``, but nova-manage needs
about 4 s of CPU just to import itself, and four of those on a 2-core
machine cost more than the schema work.  This imports only what the steps
need, once.

    python -m rapid_nova_stack.nova_db CELL0_DB_URL --config-file ... [...]

The API and cell1 databases come from the config files ([api_database] and
[database] connection), the cell1 transport URL from [DEFAULT]
transport_url.  The databases must exist and be empty.
"""

import sys
import time
import uuid


def main(argv):
    if len(argv) < 2 or not argv[1].startswith('mysql'):
        print(__doc__, file=sys.stderr)
        return 2
    cell0_url = argv[1]
    started = time.monotonic()

    from nova import config
    from nova import context
    from nova import objects
    import nova.conf
    from nova.db import migration

    conf = nova.conf.CONF
    config.parse_args(['rapid-nova-db', *argv[2:]])
    objects.register_all()

    def step(what):
        print(f'{time.monotonic() - started:6.1f} s  {what}', flush=True)

    step('imported; syncing the API database')
    migration.db_sync(database='api')

    step('mapping cell0 and cell1')
    ctxt = context.get_admin_context()
    cell0 = objects.CellMapping(
        ctxt, uuid=objects.CellMapping.CELL0_UUID, name='cell0',
        transport_url='none:///', database_connection=cell0_url)
    cell0.create()
    objects.CellMapping(
        ctxt, uuid=str(uuid.uuid4()), name='cell1',
        transport_url=conf.transport_url,
        database_connection=conf.database.connection).create()

    step('syncing the cell1 database')
    migration.db_sync(database='main')

    step('syncing the cell0 database')
    with context.target_cell(ctxt, cell0) as cctxt:
        migration.db_sync(database='main', context=cctxt)

    step('done')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
