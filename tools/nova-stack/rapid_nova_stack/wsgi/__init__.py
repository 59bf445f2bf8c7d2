"""WSGI entry modules for gunicorn.

nova's and neutron's WSGI modules hand ``sys.argv`` to oslo.config, which
would then choke on gunicorn's own arguments.  Each module here resets
``sys.argv`` to a bare program name before importing the real application;
the configuration directory comes from the OS_*_CONFIG_DIR variables that
stack.sh sets.
"""
