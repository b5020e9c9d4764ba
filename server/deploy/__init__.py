"""`ragtune serve --replicas N`: the same OpenAI API served by N engine replicas on Ray Serve.

gateway.py   the HTTP ingress: parses just enough of a request to route it, retries
             non-streamed requests once when a replica dies, answers /v1/replicas and /metrics
router.py    adapter-affinity request routing (Ray Serve's RequestRouter)
replica.py   one engine replica: the whole single-process app, driven over a handle
directory.py where replicas report themselves (resident adapters, load, metrics)
bridge.py    a proxied HTTP request run through an in-process ASGI app
app.py       the Serve application (also `serve run configs/ray/serve.yaml`)
launch.py    the `ragtune serve --replicas` process: Ray cluster, Serve, signals
"""
