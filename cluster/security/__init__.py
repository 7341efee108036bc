"""Security of the cluster's own traffic: certificates for mutual TLS between the head and its workers (certs),
and Ray's token authentication (ray_auth)."""
