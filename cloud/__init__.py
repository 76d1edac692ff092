"""The cloud: a gRPC service that holds each edge session's deep-layer KV and runs the deep layers for it.

`server` (gRPC, health, reflection, TLS, drain; front-end processes), `service` (the Session stream's protocol),
`sessions` (per-session state and limits), `auth` (identities), `errors` (status mapping), `engine/` (the batching
engine: scheduler, KV pool, runner), `ipc` (front ends to engine), `launch` (starting a server as a child process),
`cli` (`coexit serve`), `health_http` (the HTTP/1 health side port), `balancer` (the shipped balancer
configurations as processes, for tests and benchmarks).
"""
