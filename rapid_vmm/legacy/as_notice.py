"""The notice to an Acceleration Server before its VM is resized.

The original VMM tells the AS of a VM that it is about to be resized
(``DS_MIGRATION_VM_AS``); the AS stops taking new tasks, waits for the
running ones and answers OK, and only then is the VM resized (SPEC
sections 2, F6, and 7). rapid-vmm tells the AS over the protocol it
registered with (``Vm.as_protocol``):

* ``'legacy'`` (it sent ``AS_RM_REGISTER_VMM``): ``DS_MIGRATION_VM_AS`` to
  ``<VM IP>:[legacy] as_port``: the stream header, the command byte 57 on
  the raw stream (outside any block, as the original writes it), a block
  with the user id; the AS answers a block with OK (1) or ERROR (0);
* ``'rpc'`` (it called ``as_register``): a call of the optional AS-side
  RPC method ``prepare_migration(ctxt, user_id=...)`` to the server named
  ``str(user_id)`` on the topic ``[legacy] as_rpc_topic`` (default
  ``rapid_as``), version 1.0; True means ready, False refused. An AS
  without that method ("no such method", no listener, timeout) "did not
  answer".

Both are bounded by ``[legacy] as_notice_timeout``. :func:`notify_migration`
never raises; it logs the outcome once and returns an :class:`Outcome`,
whose truth value says whether the resize may go on: True when the AS
answered OK or there is no AS to ask; False when it refused or did not
answer (the original VMM did not resize then either).
"""

import enum
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging
import oslo_messaging as messaging

from rapid_vmm import exception
from rapid_vmm.legacy import client
from rapid_vmm.legacy import codec

LOG = logging.getLogger(__name__)

#: The AS-side RPC API (optional): version history.
#:
#: * 1.0 - prepare_migration(user_id) -> bool
AS_API_VERSION = '1.0'
AS_METHOD = 'prepare_migration'


class Outcome(enum.Enum):
    READY = 'ready'
    REFUSED = 'refused'
    NO_ANSWER = 'no answer'
    NO_AS = 'no AS to tell'

    def __bool__(self) -> bool:
        return self in (Outcome.READY, Outcome.NO_AS)


def _field(vm: Any, name: str) -> Any:
    if isinstance(vm, dict):
        return vm.get(name)
    return getattr(vm, name, None)


def notice_frame(user_id: int) -> bytes:
    """``DS_MIGRATION_VM_AS`` as the original writes it."""
    return (codec.Writer().write_raw_byte(codec.DS_MIGRATION_VM_AS)
            .write_long(user_id).getvalue())


def notify_migration(conf: cfg.ConfigOpts, vm: Any,
                     transport: messaging.Transport | None = None,
                     ctxt: dict | None = None) -> Outcome:
    """Tell the AS of ``vm`` (a :class:`rapid_vmm.objects.Vm` or a VM
    record with ``as_protocol``) that the VM is about to be resized.

    Call it outside any lock: it may take ``as_notice_timeout`` seconds.

    :param transport: the agent's RPC transport, for an AS that
        registered over RPC.
    """
    user_id = _field(vm, 'user_id')
    protocol = _field(vm, 'as_protocol')
    address = _field(vm, 'ip_address')
    try:
        if protocol == 'legacy':
            outcome, detail = _legacy(conf, user_id, address)
        elif protocol == 'rpc':
            outcome, detail = _rpc(conf, user_id, transport, ctxt or {})
        else:
            outcome, detail = Outcome.NO_AS, 'no AS registered'
    except Exception as exc:
        LOG.exception('The notice to the AS of user %s failed', user_id)
        outcome, detail = Outcome.NO_ANSWER, f'{type(exc).__name__}: {exc}'
    log = LOG.info if outcome in (Outcome.READY, Outcome.NO_AS) \
        else LOG.warning
    log('Resize notice to the AS of user %s (%s%s): %s (%s)', user_id,
        protocol or 'none', f' at {address}' if protocol == 'legacy' else '',
        outcome.value, detail)
    return outcome


def _legacy(conf: cfg.ConfigOpts, user_id: int,
            address: str | None) -> tuple[Outcome, str]:
    if not address:
        return Outcome.NO_ANSWER, 'the VM has no IP address'
    group = conf.legacy

    def reply(reader: codec.Reader) -> int:
        return reader.read_byte()

    try:
        status = client.exchange('AS', 'DS_MIGRATION_VM_AS',
                                 (address, group.as_port),
                                 notice_frame(user_id),
                                 group.as_notice_timeout, reply)
    except exception.PeerError as exc:
        return Outcome.NO_ANSWER, str(exc)
    if status == codec.OK:
        return Outcome.READY, 'it answered OK'
    if status == codec.ERROR:
        return Outcome.REFUSED, 'it answered ERROR'
    return Outcome.NO_ANSWER, f'it answered status {status}'


def _rpc(conf: cfg.ConfigOpts, user_id: int,
         transport: messaging.Transport | None,
         ctxt: dict) -> tuple[Outcome, str]:
    if transport is None:
        return Outcome.NO_ANSWER, 'no RPC transport to reach it'
    timeout = conf.legacy.as_notice_timeout
    target = messaging.Target(topic=conf.legacy.as_rpc_topic,
                              server=str(user_id), version=AS_API_VERSION)
    rpc_client = messaging.get_rpc_client(transport, target,
                                          version_cap=AS_API_VERSION,
                                          timeout=timeout)
    try:
        answer = rpc_client.prepare(timeout=timeout, retry=1).call(
            ctxt, AS_METHOD, user_id=user_id)
    except messaging.MessagingTimeout:
        return Outcome.NO_ANSWER, f'no answer within {timeout:g} s'
    except messaging.RemoteError as exc:
        return Outcome.NO_ANSWER, f'{exc.exc_type}: {exc.value}'[:200]
    except messaging.MessagingException as exc:
        return Outcome.NO_ANSWER, f'{type(exc).__name__}: {exc}'[:200]
    if answer is True:
        return Outcome.READY, 'it answered ready'
    if answer is False:
        return Outcome.REFUSED, 'it answered not ready'
    return Outcome.NO_ANSWER, f'it answered {answer!r:.60}'
