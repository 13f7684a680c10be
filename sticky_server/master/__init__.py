"""The master's side: the loop, its parts, the workers' lifecycle and the master's operations.

``loop`` runs everything below on one thread: the ``supervisor`` decides the
workers' lifecycle, each worker's ``link`` its traffic and the conditions that take
it out of routing, the ``router`` where connections go, ``intake`` reads proxy
headers; ``stats``, ``metrics``, ``pidfile`` and ``status_page`` tell the outside.
"""
