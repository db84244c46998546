"""The coordinator side of fedsmm: everything that runs at the server.

``loop.run_federation`` is the workflow (preflight, rounds, evaluation, final model) over a
transport (``messages``); ``guard`` and ``strategy`` make aggregation safe; ``wait``,
``checkpoint``, ``runlog`` and ``atomic`` make the run bounded, resumable and its files whole;
``app`` is the Flower ServerApp. Only ``app`` and ``strategy`` import ``flwr``.
"""
