"""gunicorn target: glance's API (``...glance_api:application``)."""
import sys

sys.argv = ['glance-api']

from glance.wsgi.api import application  # noqa: E402,F401
