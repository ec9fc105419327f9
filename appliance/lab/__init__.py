"""The namespace lab: a whole cluster in network namespaces (model, topology, nodes, daemons, lifecycle), the faults
it injects and what clients see of them (faults, measure), and the helper programs run inside it (helpers)."""
