"""Serving past one GPU and one machine, on Ray: `xportrait serve --workers N | --ray-address ADDRESS`.

  front.py      the HTTP front (plain serve's server, its checks and its page): forwards each
                offer to a worker with a free slot, control requests to the session's worker,
                and aggregates /stats; watches the workers and says why a session ended
  worker.py     the Ray actor: one engine pool and its own WebRTC peers (aiortc in the actor's
                event loop), so media flows straight between the browser and the worker
  placement.py  a local Ray or a running cluster, and the named, detached workers on it
                (num_gpus=1 for the diffusion engine, CPUs for the warp engine)

Importing this package imports no Ray; its modules import it where they use it (Ray is the
`cluster` extra: pip install 'xportrait[cluster]'). Plain `serve` never comes here.
"""
