"""pullthrough: a container registry mirror and pull-through cache.

The code lives in the repository's top-level folders ``proxy/`` (the HTTP side),
``cache/`` (storage) and ``metrics/``; this package links them so that they are
installed, imported and type-checked as ``pullthrough.proxy``, ``pullthrough.cache``
and ``pullthrough.metrics``, never as global packages of those generic names.
"""
