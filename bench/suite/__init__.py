"""The side-by-side benchmark suite: pullthrough, distribution's proxy, nginx, the upstream.

Run it with ``python -m bench.suite`` from the repository's root; see ``README.md``
next to this file.
"""
