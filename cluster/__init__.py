"""kimi-cluster beyond one process. Imports run one way: cli/ -> server/ -> the cluster -> runtime/.

This folder is the distributed runtime: the cluster config, placement by memory budget, the head's bring-up
(head.py), the expert workers (Ray actors), the transport (the only gRPC importer), failover, recovery,
shard transfer and routing counts. Beside it, one package per concern:

    security/    certificates for mutual TLS, Ray's token authentication
    cost_model/  the speed to expect (estimate) from figures measured on each machine (probe)
    server/      the HTTP API: one service, one module per protocol
    cli/         the command line: one module per group of subcommands
"""
