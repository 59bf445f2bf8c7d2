"""Option group helper shared by the conf modules."""

from oslo_config import cfg


def register_group(conf: cfg.ConfigOpts, group: cfg.OptGroup,
                   opts: list) -> cfg.OptGroup:
    """Register ``opts`` under a fresh copy of ``group`` on ``conf``.

    oslo.config copies an OptGroup only shallowly when it is registered, so
    one module-level group shared by several ConfigOpts objects (the agent's
    and a test's, say) would leak overrides between them.
    """
    fresh = cfg.OptGroup(group.name, title=group.title, help=group.help)
    conf.register_group(fresh)
    conf.register_opts(opts, group=fresh)
    return fresh
