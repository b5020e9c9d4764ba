"""`ragtune serve --replicas N`: the same OpenAI API served by N engine replicas on Ray Serve.

Clients reach Serve's HAProxy, which asks the route chooser where each POST goes and then
connects the client straight to that replica's own HTTP server (Serve's direct ingress).

replica.py        one engine replica: the whole single-process app, serving HTTP itself
front.py          a replica's cluster-wide routes (/ready, /metrics, /v1/replicas) and admin lease
route_chooser.py  `/internal/route` for HAProxy: which replica takes a request; keeps the directory
router.py         adapter-affinity routing policy (Ray Serve's RequestRouter)
directory.py      where replicas report themselves (resident adapters, load, metrics); admin lease
app.py            the Serve application (also `serve run configs/ray/serve.yaml`)
launch.py         the `ragtune serve --replicas` process: environment, Ray cluster, Serve, signals
haproxy_errors.py `ragtune-haproxy`: Serve's HAProxy, its own errors in OpenAI's shape
process.py        start that process and wait until every replica is ready (tests, bench)
"""
