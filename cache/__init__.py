"""Content-addressed storage for pullthrough: blobs, manifests and the tag index.

This package never imports ``aiohttp.web`` nor ``proxy``: it knows files, digests
and locks, not HTTP.
"""
