"""Operating a federation: the ``smm simulate`` launcher and the ``smm certs`` credentials."""
