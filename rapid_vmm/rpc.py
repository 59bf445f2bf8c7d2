"""oslo.messaging plumbing shared by the agent, its clients and tests."""

import functools
import inspect
import weakref

import futurist
from oslo_config import cfg
from oslo_log import log as logging
import oslo_messaging as messaging
from oslo_messaging.rpc import dispatcher as rpc_dispatcher

from rapid_vmm import exception

LOG = logging.getLogger(__name__)

#: Modules whose exceptions are rebuilt as themselves on the caller's side.
ALLOWED_EXMODS = ['rapid_vmm.exception']

#: How often a cast or call retries a broken broker connection before it
#: gives up; bounds the time a peer notification can block the agent.
PEER_RETRY = 3


def get_transport(conf: cfg.ConfigOpts) -> messaging.Transport:
    """Return the RPC transport of ``conf.transport_url``."""
    return messaging.get_rpc_transport(conf,
                                       allowed_remote_exmods=ALLOWED_EXMODS)


class ShrinkingThreadPool(futurist.DynamicThreadPoolExecutor):
    """The RPC servers' worker pool: grows to its size, shrinks when idle.

    oslo.messaging's default pool keeps every thread it ever started, and
    each idle thread wakes once a second: a pool of 100 that served a burst
    costs about 1 % of a core forever. This one lets :func:`maintain_pools`
    retire idle threads.
    """

    _instances: 'weakref.WeakSet[ShrinkingThreadPool]' = weakref.WeakSet()

    def __init__(self, max_workers: int | None = None, **kwargs):
        super().__init__(max_workers=max_workers, **kwargs)
        ShrinkingThreadPool._instances.add(self)


def worker_pool(max_workers: int | None = None, **kwargs):
    """A :class:`ShrinkingThreadPool`, or a plain one for a single worker
    (nothing to shrink; futurist wants at least two for a dynamic pool)."""
    if max_workers is not None and max_workers < 2:
        return futurist.ThreadPoolExecutor(max_workers=max_workers, **kwargs)
    return ShrinkingThreadPool(max_workers=max_workers, **kwargs)


def maintain_pools() -> None:
    """Retire idle worker threads of every RPC server's pool."""
    for pool in list(ShrinkingThreadPool._instances):
        try:
            pool.maintain()
        except RuntimeError:  # shut down meanwhile
            continue


def get_server(conf: cfg.ConfigOpts, transport: messaging.Transport,
               target: messaging.Target, endpoints: list,
               pool_size: int):
    """Return an RPC server whose worker pool has ``pool_size`` threads.

    The pool is a :class:`ShrinkingThreadPool`; oslo.messaging has no
    public way to choose it, so the server's executor class is replaced
    before it starts (and left alone if a release renames the attribute).
    """
    server = messaging.get_rpc_server(
        transport, target, endpoints,
        access_policy=messaging.DefaultRPCAccessPolicy)
    conf.set_override('executor_thread_pool_size', pool_size)
    if getattr(server, '_executor_cls', None) is futurist.ThreadPoolExecutor:
        server._executor_cls = worker_pool
    else:
        LOG.debug('RPC server executor %r kept',
                  getattr(server, '_executor_cls', None))
    return server


def get_client(transport: messaging.Transport, target: messaging.Target,
               version_cap: str, timeout: float | None = None
               ) -> messaging.RPCClient:
    return messaging.get_rpc_client(transport, target,
                                    version_cap=version_cap,
                                    timeout=timeout)


def remotable(func):
    """Decorate a VMM API method served over RPC.

    * a call with missing or unknown keyword arguments gets
      :class:`InvalidRequest` instead of a server-side ``TypeError``;
    * any other error is logged with its traceback and reaches the caller as
      :class:`InternalError` (a :class:`DriverError`), never untyped;
    * the typed errors of :data:`rapid_vmm.exception.EXPECTED_ERRORS` reach
      the caller as themselves without a traceback in the agent's log (they
      are logged once here, at warning level, with the method name).
    """
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(self, context, *args, **kwargs):
        try:
            try:
                signature.bind(self, context, *args, **kwargs)
            except TypeError as exc:
                raise exception.InvalidRequest(
                    reason=f'{func.__name__}: {exc}') from None
            return func(self, context, *args, **kwargs)
        except exception.EXPECTED_ERRORS as error:
            LOG.warning('%s refused: %s', func.__name__, error)
            raise rpc_dispatcher.ExpectedException() from error
        except Exception as unexpected:
            LOG.exception('%s failed unexpectedly', func.__name__)
            try:
                raise exception.InternalError(
                    action=func.__name__,
                    reason=f'{type(unexpected).__name__}: {unexpected}'
                ) from unexpected
            except exception.InternalError:
                raise rpc_dispatcher.ExpectedException() from None

    return wrapper
