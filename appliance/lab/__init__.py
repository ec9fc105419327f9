"""The namespace lab: two nodes, a client and an origin in network namespaces, faults and measurement."""
