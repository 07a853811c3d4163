"""The HTTP side of pullthrough: app factory, routes, upstream client, auth and CLI."""
