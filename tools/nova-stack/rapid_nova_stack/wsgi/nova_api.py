"""gunicorn target: nova's compute API (``...nova_api:application``)."""
import sys

sys.argv = ['nova-api']

from nova.wsgi.osapi_compute import application  # noqa: E402,F401
