"""A paste filter that stands in for keystonemiddleware's auth_token.

There is no Keystone in the test stack.  A token is plain text that names the
caller::

    USER:PROJECT[:ROLE,ROLE,...]

Without an explicit role list, the user ``admin`` gets
``admin,member,reader`` (what Keystone's implied roles would give) and
everybody else ``member,reader``.  A token that does not match the pattern
(for example ``"not a token"``, or the ``notused`` that keystoneauth's
``none`` plugin sends) is rejected with 401, which lets tests see an
authentication failure.

``X-Service-Token`` is parsed the same way, with ``service`` as the default
role list, and becomes the ``X-Service-*`` headers.

Identity headers sent by the client are always dropped first, so a caller
cannot claim an identity other than the one its token names.
"""

import json
import re

_TOKEN_RE = re.compile(
    r'^(?P<user>[A-Za-z0-9_.-]+)'
    r':(?P<project>[A-Za-z0-9_.-]+)'
    r'(?::(?P<roles>[A-Za-z0-9_.,-]*))?$')

# WSGI environ keys that only the auth layer may set.
_IDENTITY_PREFIXES = (
    'HTTP_X_IDENTITY_STATUS',
    'HTTP_X_USER',
    'HTTP_X_PROJECT',
    'HTTP_X_TENANT',
    'HTTP_X_ROLE',
    'HTTP_X_DOMAIN',
    'HTTP_X_SYSTEM_SCOPE',
    'HTTP_OPENSTACK_SYSTEM_SCOPE',
    'HTTP_X_IS_ADMIN_PROJECT',
    'HTTP_X_SERVICE_',
    'HTTP_X_AUTHORIZATION',
)
_KEEP = ('HTTP_X_SERVICE_TOKEN',)


def parse_token(token, default_roles):
    """Return (user, project, roles) for a token text, or None if invalid."""
    match = _TOKEN_RE.match(token.strip()) if token else None
    if match is None:
        return None
    user = match.group('user')
    project = match.group('project')
    roles = match.group('roles')
    if roles is None:
        roles = default_roles(user)
    else:
        roles = [r for r in roles.split(',') if r]
    return user, project, roles


def _user_roles(user):
    if user == 'admin':
        return ['admin', 'member', 'reader']
    return ['member', 'reader']


def _service_roles(_user):
    return ['service']


def _identity(prefix, user, project, roles):
    return {
        f'HTTP_X_{prefix}IDENTITY_STATUS': 'Confirmed',
        f'HTTP_X_{prefix}USER_ID': user,
        f'HTTP_X_{prefix}USER_NAME': user,
        f'HTTP_X_{prefix}USER_DOMAIN_ID': 'default',
        f'HTTP_X_{prefix}USER_DOMAIN_NAME': 'Default',
        f'HTTP_X_{prefix}PROJECT_ID': project,
        f'HTTP_X_{prefix}PROJECT_NAME': project,
        f'HTTP_X_{prefix}PROJECT_DOMAIN_ID': 'default',
        f'HTTP_X_{prefix}PROJECT_DOMAIN_NAME': 'Default',
        f'HTTP_X_{prefix}ROLES': ','.join(roles),
    }


class TokenTextAuth:
    """WSGI middleware: token text -> Keystone-style identity headers."""

    def __init__(self, app, delay_auth_decision=False):
        self.app = app
        self.delay_auth_decision = delay_auth_decision

    def __call__(self, environ, start_response):
        for key in [k for k in environ
                    if k.startswith(_IDENTITY_PREFIXES) and k not in _KEEP]:
            del environ[key]

        ident = parse_token(environ.get('HTTP_X_AUTH_TOKEN', ''), _user_roles)
        if ident is None:
            if self.delay_auth_decision:
                # glance decides itself (its context filter answers 401).
                environ['HTTP_X_IDENTITY_STATUS'] = 'Invalid'
                return self.app(environ, start_response)
            return self._reject(start_response)

        user, project, roles = ident
        environ.update(_identity('', user, project, roles))
        # Legacy names some services still read.
        environ['HTTP_X_TENANT_ID'] = project
        environ['HTTP_X_TENANT_NAME'] = project
        environ['HTTP_X_ROLE'] = ','.join(roles)

        service = parse_token(environ.get('HTTP_X_SERVICE_TOKEN', ''),
                              _service_roles)
        if service is not None:
            environ.update(_identity('SERVICE_', *service))
        return self.app(environ, start_response)

    @staticmethod
    def _reject(start_response):
        body = json.dumps({'error': {
            'code': 401, 'title': 'Unauthorized',
            'message': 'The request you have made requires authentication.',
        }}).encode()
        start_response('401 Unauthorized', [
            ('Content-Type', 'application/json'),
            ('Content-Length', str(len(body))),
            ('WWW-Authenticate', 'Keystone uri="none"'),
        ])
        return [body]


def _as_bool(value):
    return str(value).strip().lower() in ('1', 'true', 'yes', 'on')


def filter_factory(global_conf, **local_conf):
    """Paste entry: ``paste.filter_factory = rapid_nova_stack.auth:...``."""
    conf = dict(global_conf)
    conf.update(local_conf)
    delay = _as_bool(conf.get('delay_auth_decision', False))

    def _filter(app):
        return TokenTextAuth(app, delay_auth_decision=delay)
    return _filter
