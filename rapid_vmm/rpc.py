"""oslo.messaging plumbing shared by the agent, its clients and tests."""

import functools
import inspect
import weakref

import futurist
from oslo_config import cfg
from oslo_context import context as oslo_context
from oslo_log import log as logging
import oslo_messaging as messaging
from oslo_messaging.rpc import dispatcher as rpc_dispatcher
from oslo_messaging.rpc import server as rpc_server

from rapid_vmm import exception

LOG = logging.getLogger(__name__)

#: Modules whose exceptions are rebuilt as themselves on the caller's side.
ALLOWED_EXMODS = ['rapid_vmm.exception']

#: How often a cast or call retries a broken broker connection before it
#: gives up; bounds the time a peer notification can block the agent.
PEER_RETRY = 3

#: The same bound for the callers of the VMM API (:class:`VmmAPI`).
CLIENT_RETRY = 2


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


#: VMM API methods that never wait for a VM, an AS or a user's lock. They
#: get a pool of their own: any number of starts waiting for their AS can
#: then never keep that AS from registering (``as_register``,
#: ``as_confirm``) or a caller from reading.
QUICK_METHODS = frozenset({'as_register', 'as_confirm', 'get_vm_info',
                           'get_vm_usage', 'get_host_status'})


class ApiExecutor:
    """The worker pools of the VMM API's RPC server.

    ``max_workers`` (``max_concurrent_requests``) threads serve the
    lifecycle methods; a smaller pool serves :data:`QUICK_METHODS`.
    oslo.messaging hands every request to one executor; this one picks
    the pool by the request's method name.
    """

    def __init__(self, max_workers: int | None = None):
        size = max_workers or 100
        self.lifecycle = worker_pool(size)
        self.quick = worker_pool(max(4, min(32, size // 4)))

    def submit(self, fn, *args, **kwargs):
        return self._pool_of(args).submit(fn, *args, **kwargs)

    def _pool_of(self, args: tuple):
        try:
            incoming = args[0]
            message = incoming[0] if isinstance(incoming, list) else incoming
            method = message.message.get('method')
        except (IndexError, AttributeError, TypeError):
            return self.lifecycle
        return self.quick if method in QUICK_METHODS else self.lifecycle

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        self.lifecycle.shutdown(wait=wait, **kwargs)
        self.quick.shutdown(wait=wait, **kwargs)


def maintain_pools() -> None:
    """Retire idle worker threads of every RPC server's pool."""
    for pool in list(ShrinkingThreadPool._instances):
        try:
            pool.maintain()
        except RuntimeError:  # shut down meanwhile
            continue


class RequestContextSerializer(messaging.Serializer):
    """Carries an oslo.context ``RequestContext`` over RPC.

    The receiving side gets a ``RequestContext`` built from the caller's
    context dict (a new request id when the caller sent none); building it
    makes it the thread's current context, so every log line of the
    request carries its request id. Anything that is not a dict is
    replaced by a fresh context.
    """

    def __init__(self, base: messaging.Serializer | None = None):
        self._base = base or messaging.NoOpSerializer()

    def serialize_entity(self, ctxt, entity):
        return self._base.serialize_entity(ctxt, entity)

    def deserialize_entity(self, ctxt, entity):
        return self._base.deserialize_entity(ctxt, entity)

    def serialize_context(self, ctxt):
        if isinstance(ctxt, oslo_context.RequestContext):
            return ctxt.to_dict()
        return dict(ctxt or {})

    def deserialize_context(self, ctxt):
        values = ctxt if isinstance(ctxt, dict) else {}
        request_id = values.get('request_id')
        if not isinstance(request_id, str) or len(request_id) > 128:
            values = dict(values)
            values.pop('request_id', None)
            values.pop('global_request_id', None)
        try:
            return oslo_context.RequestContext.from_dict(values)
        except Exception:  # noqa: BLE001 - a bad context never stops it
            return oslo_context.RequestContext()


class ApiDispatcher(messaging.RPCDispatcher):
    """An RPC dispatcher whose refusals are typed errors, not tracebacks.

    A method that is not part of the API, an unsupported version or a
    message whose arguments are not a mapping reaches the caller as
    :class:`InvalidRequest`, and the agent logs one warning line (the stock
    dispatcher logs such calls with a traceback).
    """

    def dispatch(self, incoming):
        message = incoming.message if isinstance(incoming.message,
                                                 dict) else {}
        method = message.get('method')
        try:
            if not isinstance(method, str) or \
                    not isinstance(message.get('args', {}), dict):
                raise exception.InvalidRequest(
                    reason='an RPC message needs a method name and keyword '
                           'arguments')
            try:
                return super().dispatch(incoming)
            except rpc_dispatcher.NoSuchMethod:
                raise exception.InvalidRequest(
                    reason=f'{method!r:.60} is not a method of the VMM '
                           'API') from None
            except rpc_dispatcher.UnsupportedVersion as exc:
                raise exception.InvalidRequest(
                    reason=f'version {exc.version!r:.20} of the VMM API is '
                           f'not supported (this agent serves up to '
                           f'{API_VERSION})') from None
        except exception.InvalidRequest as error:
            LOG.warning('RPC %.60r refused: %s', method, error)
            raise rpc_dispatcher.ExpectedException() from error


#: Version of the VMM API served (SPEC 4).
API_VERSION = '1.0'


def get_server(conf: cfg.ConfigOpts, transport: messaging.Transport,
               target: messaging.Target, endpoints: list,
               pool_size: int, explicit: bool = False):
    """Return an RPC server whose worker pool has ``pool_size`` threads.

    ``explicit``: only endpoint methods marked with ``messaging.expose``
    are reachable (the agent's API endpoint); requests get a
    :class:`RequestContextSerializer` context and an :class:`ApiDispatcher`.

    The pool is a :class:`ShrinkingThreadPool`; oslo.messaging has no
    public way to choose it, so the server's executor class is replaced
    before it starts (and left alone if a release renames the attribute).
    """
    if explicit:
        dispatcher = ApiDispatcher(
            endpoints, RequestContextSerializer(),
            messaging.ExplicitRPCAccessPolicy)
        server = rpc_server.RPCServer(transport, target, dispatcher)
    else:
        server = messaging.get_rpc_server(
            transport, target, endpoints,
            access_policy=messaging.DefaultRPCAccessPolicy)
    conf.set_override('executor_thread_pool_size', pool_size)
    if getattr(server, '_executor_cls', None) is futurist.ThreadPoolExecutor:
        server._executor_cls = ApiExecutor if explicit else worker_pool
    else:
        LOG.debug('RPC server executor %r kept',
                  getattr(server, '_executor_cls', None))
    return server


def get_client(transport: messaging.Transport, target: messaging.Target,
               version_cap: str, timeout: float | None = None
               ) -> messaging.RPCClient:
    return messaging.get_rpc_client(transport, target,
                                    version_cap=version_cap,
                                    timeout=timeout,
                                    serializer=RequestContextSerializer())


def remotable(func):
    """Mark a VMM API method as reachable over RPC, with typed errors.

    * the method is exposed (``messaging.expose``) for an endpoint served
      with ``ExplicitRPCAccessPolicy``: nothing else of the object is;
    * positional arguments, missing or unknown keyword arguments (including
      one named ``context`` or ``ctxt``) get :class:`InvalidRequest` instead
      of a server-side ``TypeError``;
    * any other error is logged with its traceback and reaches the caller as
      :class:`InternalError` (a :class:`DriverError`), never untyped;
    * the typed errors of :data:`rapid_vmm.exception.EXPECTED_ERRORS` reach
      the caller as themselves without a traceback in the agent's log (they
      are logged once here, at warning level, with the method name).
    """
    signature = inspect.signature(func)
    # The usual shape (every argument after the context keyword-only) is
    # checked with two set comparisons; anything else, and every call
    # that fails them, goes through Signature.bind for its exact message.
    params = list(signature.parameters.values())[2:]
    keyword_only = all(p.kind is p.KEYWORD_ONLY for p in params)
    allowed = frozenset(p.name for p in params)
    required = frozenset(p.name for p in params if p.default is p.empty)

    @functools.wraps(func)
    def wrapper(self, context, /, *args, **kwargs):
        try:
            try:
                if args:
                    raise TypeError('the VMM API takes keyword arguments '
                                    'only')
                if not (keyword_only and
                        required <= kwargs.keys() <= allowed):
                    signature.bind(self, context, **kwargs)
            except TypeError as exc:
                raise exception.InvalidRequest(
                    reason=f'{func.__name__}: {exc}') from None
            return func(self, context, **kwargs)
        except exception.EXPECTED_ERRORS as error:
            if getattr(self, 'log_refusals', True):
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

    return messaging.expose(wrapper)
