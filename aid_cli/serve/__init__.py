"""`aid serve`: a local web page to paint a mask with a brush, fill it and compare methods and seeds side by side.

engine.py: the models a page may choose, the one backbone kept loaded, the queue of fills (fill.fill, as `aid
inpaint`). server.py: the HTTP side (standard library), its checks and limits. static/: the page (plain HTML, CSS
and JavaScript, package data; nothing from the internet). docs/serve.md has the design notes.
"""

from .server import AidServer, make_server, start_in_thread

__all__ = ["AidServer", "make_server", "start_in_thread"]
