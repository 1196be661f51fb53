"""The ``backfill`` command line: the dispatcher and the commands that belong to no one side
(``status``, ``inspect topic``, ``demo``).

The top floor of the runtime: may import every runtime package. It names the producers' and
consumers' commands only through the ``atproto_backfill.commands`` entry points, never by import.
"""
